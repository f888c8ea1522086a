"""The cheaper dropout mask: Bernoulli with the right rate, seeded, and an encoder it leaves
unchanged in eval mode and masks as SDPA does while training."""
import pytest
import torch
from transformers import BertConfig, BertModel

from parlai_poly.modules import TextEncoder
from parlai_poly.modules import dropout as fast


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_is_bernoulli_with_the_asked_rate(p):
    n = 1_000_000
    mask = fast.keep_mask(torch.Size([1000, 1000]), p, torch.float32)
    values = mask.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - p))]
    kept = (mask > 0).float()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * sd
    # the four 16-bit lanes of one draw are independent: both of two neighbours dropped ~ p^2
    both = ((kept[:, 0::2] == 0) & (kept[:, 1::2] == 0)).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (n / 2)) ** 0.5


def test_mask_follows_the_seed():
    torch.manual_seed(3)
    first = fast.keep_mask(torch.Size([257]), 0.3, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(first, fast.keep_mask(torch.Size([257]), 0.3, torch.float32))
    assert not torch.equal(first, fast.keep_mask(torch.Size([257]), 0.3, torch.float32))


def test_dropout_gradient_is_the_mask_and_eval_is_identity():
    x = torch.randn(64, 33, requires_grad=True)
    y = fast.fast_dropout(x, 0.2, training=True)
    y.sum().backward()
    scale = torch.where(y != 0, y / x, torch.zeros_like(y))
    assert torch.allclose(x.grad, scale)
    assert torch.allclose(scale[scale != 0], torch.tensor(1 / 0.8))
    assert fast.fast_dropout(x, 0.2, training=False) is x
    assert torch.equal(fast.fast_dropout(x, 1.0, training=True), torch.zeros_like(x))


def tiny_bert(dropout):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertModel(config)


def padded_ids():
    ids = torch.randint(5, 100, (3, 9))
    ids[1, 6:] = 0
    ids[2, 2:] = 0
    return ids


def test_encoder_swaps_every_dropout_and_is_unchanged_in_eval():
    ids = padded_ids()
    stock = tiny_bert(0.1).eval()
    encoder = TextEncoder(tiny_bert(0.1).eval(), pad_idx=0)  # eval before the swap: kept after it
    assert not any(type(m) is torch.nn.Dropout for m in encoder.modules())
    assert sum(isinstance(m, fast.FastDropout) for m in encoder.modules()) == 1 + 2 * 3  # embeddings; per layer weights, attention out, FFN out
    assert encoder.backbone.config._attn_implementation == fast.FAST_ATTENTION
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        hidden, mask = encoder(ids)
    assert torch.allclose(hidden[mask], expected[mask], atol=1e-6)


def test_training_attention_masks_padding_as_sdpa_does(monkeypatch):
    """With every unit kept, the training path (our product-softmax-product) equals SDPA's."""
    ids = padded_ids()
    stock = tiny_bert(0.0).train()
    encoder = TextEncoder(tiny_bert(0.1), pad_idx=0).train()
    monkeypatch.setattr(fast, "keep_mask", lambda shape, p, dtype, device=None: torch.ones(shape, dtype=dtype))
    expected = stock(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    hidden, mask = encoder(ids)
    assert torch.allclose(hidden[mask], expected[mask], atol=1e-5)
    monkeypatch.undo()
    torch.manual_seed(0)
    dropped, _ = encoder(ids)
    assert not torch.allclose(dropped[mask], expected[mask], atol=1e-3)  # and it does drop


def test_bf16_attention_weights_are_a_float32_softmax_rounded_once(monkeypatch):
    """The training attention takes its softmax in the logits' dtype: in bfloat16 the weights
    are the float32 softmax's, rounded once, and their gradient is as close as bfloat16 allows."""
    seen = []
    real_matmul = torch.matmul
    monkeypatch.setattr(fast, "keep_mask", lambda shape, p, dtype, device=None: torch.ones(shape, dtype=dtype))
    monkeypatch.setattr(torch, "matmul", lambda a, b: seen.append(a) or real_matmul(a, b))
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 7, 16).mul(3).bfloat16().requires_grad_() for _ in range(3))
    module = torch.nn.Module().train()
    out, _ = fast.attention_with_fast_dropout(module, query, key, value, None, dropout=0.1, scaling=0.25)
    weights = seen[1]  # [B, heads, T, T]: the second product's left factor
    logits = real_matmul(query, key.transpose(2, 3)) * 0.25  # bfloat16, as the function makes them
    assert weights.dtype == torch.bfloat16
    assert torch.equal(weights, torch.softmax(logits.float(), -1).bfloat16())
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, query, grad)[0]
    monkeypatch.undo()
    reference_weights = torch.softmax(query.float() @ key.float().transpose(2, 3) * 0.25, -1)
    reference = torch.autograd.grad(
        (reference_weights @ value.float()).transpose(1, 2), query, grad.float()
    )[0]
    assert ((ours.float() - reference).norm() / reference.norm()).item() < 0.02
