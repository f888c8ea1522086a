"""Dropout whose random mask costs a third of torch's on CPU, and the attention that uses it.

torch draws a dropout mask with one call of its CPU generator per element, serially: 13 ms for
the 1.6M attention weights of one MiniLM layer at batch 32 on this project's 2 cores, and 17% of
a whole bf16 training step (torch.profiler, ``aten::bernoulli_``). One 64-bit draw holds four
16-bit lanes; keeping a lane when it is at least p * 2^16 is Bernoulli(1 - p) with p rounded to
a multiple of 1/65,536, from the same seeded generator: 4.5 ms for the same mask.

Attention dropout happens inside the attention function, so BERT-like Hugging Face encoders
get one registered under ``FAST_ATTENTION``: transformers' SDPA when nothing is dropped
(inference), and while training the plain product-softmax-product with this dropout on the
weights, which is what SDPA itself falls back to on CPU when it must drop (its math path).
The same function reads a pair of texts with gated attention across them when the
cross-encoder asks (``two_text_weights``; ``cross_encoder.py``).
"""
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FAST_ATTENTION = "parlai_poly_sdpa"
_LANES = 4  # 16-bit lanes per 64-bit draw
_LANE_RANGE = 1 << 16


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[*shape] of 0 and 1 / (1 - p): each element kept with probability 1 - p."""
    count = shape.numel()
    words = torch.empty((count + _LANES - 1) // _LANES, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # the whole 64-bit range: every lane is uniform
    lanes = words.view(torch.int16)[:count].view(shape)  # uniform on [-2^15, 2^15)
    threshold = round(p * _LANE_RANGE) - _LANE_RANGE // 2
    return (lanes >= threshold).to(dtype).mul_(1.0 / (1.0 - p))


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with the cheaper mask; the gradient is the mask's too."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    return x * keep_mask(x.shape, p, x.dtype, x.device)


class FastDropout(nn.Dropout):
    """A drop-in ``nn.Dropout`` (same ``p``, same train/eval switch) with the cheaper mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention_with_fast_dropout(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, two_text_gates=None, **kwargs
):
    """transformers' attention interface: query/key/value [B, heads, T, d_head], mask boolean
    [B, 1, T, T] (True attends) or additive float, or None -> ([B, T, heads, d_head], None).
    ``two_text_gates`` (across [B, 1, T, T], gates [layers, heads]): see ``two_text_weights``."""
    if dropout == 0.0 and two_text_gates is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, heads, T, T]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
    elif attention_mask is not None:
        logits = logits + attention_mask
    if two_text_gates is not None:
        across, gates = two_text_gates
        weights = two_text_weights(logits, across, gates[module.layer_idx]).to(query.dtype)
    else:
        # in the logits' own dtype: torch's softmax accumulates bfloat16 in float32 and rounds
        # once, so the weights are the same bits as a float32 softmax cast back, without a float32
        # [B, heads, T, T] copy each way on CPU (tests/test_dropout.py checks the bits); CUDA's
        # autocast runs softmax in float32 whatever it is given, hence the cast back (else a no-op)
        weights = torch.softmax(logits, dim=-1).to(query.dtype)
    weights = fast_dropout(weights, dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def two_text_weights(logits: torch.Tensor, across: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Attention weights [B, heads, T, T] over a pair of texts from logits [B, heads, T, T]
    (padding already masked), across [B, 1, T, T] (True where query and key are in different
    texts) and this layer's gates [heads]: each token's softmax over its own text, plus gate
    times the other text's part of one softmax over both. At gate 0 each text is read alone,
    exactly; the attention across is added to the text's own rather than taking weight from
    it, so a gate's gradient at 0 is that of the whole attention across (a bias on the logits
    gets e^bias of it). The part of the joint softmax, not a softmax over the other text alone,
    because that one averages the other text whatever the match (its weights sum to 1), so
    every candidate would move a context alike; this one weighs the other text by how its
    keys match against the token's own."""
    lowest = torch.finfo(logits.dtype).min
    own = torch.softmax(logits.masked_fill(across, lowest), dim=-1)
    other = torch.softmax(logits, dim=-1).masked_fill(~across, 0.0)
    return own + gates.to(own.dtype)[None, :, None, None] * other


AttentionInterface.register(FAST_ATTENTION, attention_with_fast_dropout)
AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)  # the masks SDPA gets


def use_fast_dropout(backbone: nn.Module) -> nn.Module:
    """Swap every ``nn.Dropout`` in a Hugging Face encoder for ``FastDropout`` and, where it runs
    transformers' SDPA attention, for the attention above. Weights and outputs in eval mode
    are untouched. Returns the backbone."""
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p).train(child.training))
    config = getattr(backbone, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        config._attn_implementation = FAST_ATTENTION
    return backbone
