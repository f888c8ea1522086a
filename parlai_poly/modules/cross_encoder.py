"""Cross-encoder: context and candidate encoded together.

    h = T([ctxt ; cand])
    linear head (the paper's):  score = red(h) . W
    segment-cosine head:        score = s * cos(mean(h over ctxt), mean(h over cand))

with segment 0 for the context ([CLS] ctxt [SEP]) and 1 for the candidate (cand [SEP]).
The linear head starts at chance; the segment-cosine head starts from what a backbone trained
as a mean-pooled bi-encoder (all-MiniLM-L6-v2) already knows, well above chance before any
fine-tuning, and every token still attends across the pair.

With ``segment_attention_bias`` b, the pair is laid out as the bi-encoder reads its two texts
([CLS] ctxt [SEP] [CLS] cand [SEP], each text's positions from 0, token type 0), and every
attention logit between a context token and a candidate token gets a learned per-head bias
(the same in every layer) starting at b:

    logits[h, i, j] = q_i . k_j / sqrt(d_h) + (bias[h] if seg(i) != seg(j) else 0)

At b = -inf this is exactly a bi-encoder (shared encoder, mean pooling, cosine); at b = -8 it
starts as one (a cross token weighs e^-8 of a token of its own text), so a cross-encoder
initialized from a fine-tuned bi-encoder starts at that bi-encoder's accuracy instead of
below it, and training opens the attention across the pair where reading across helps.

With ``segment_gate`` g instead (the same layout), each token's attention is its softmax over
its own text plus a learned gate (per layer and head, starting at g) times its softmax over
the other text:

    out_i = softmax_{j in own(i)}(q_i . k_j) V + gate[layer, h] * softmax_{j in other(i)}(q_i . k_j) V

At g = 0 this is exactly the bi-encoder, and the attention across is added to what a token
reads of its own text instead of taking weight from it: the gate's gradient at 0 is that of
the whole attention across, where the bias's at -8 is e^-8 of it (a zero-initialised gate,
as Flamingo adds new attention to a trained model).
With the ``reader`` head (the same layout), the two texts are read apart, exactly as the
bi-encoder reads them, and one more token in front of the pair, the reader (a copy of the
[CLS]), attends to both texts in every layer while no other token attends to it:

    score = s * cos(mean(h over ctxt), mean(h over cand)) + w . h_reader,   w starting at 0

So the cross-encoder starts as the bi-encoder it is initialized from, and what it learns on top
comes from reading across, through the reader, without moving what the two texts' own tokens
read (the gate and the bias above open attention for every token, and the two-mean cosine then
moves with it for every candidate alike).
With the ``residual`` head, the bi-encoder's score is kept as it is and the cross-encoder
learns only what to add to it:

    score = s0 * cos(mean(h0 over ctxt), mean(h0 over cand)) + w . mean(h over [ctxt ; cand])

h0 is a frozen copy of the encoder as it starts (the bi-encoder given with --init-model), each
text read alone; h is the trainable encoder reading the pair with full attention, as the paper's
cross-encoder does; w starts at 0. So it starts exactly as that bi-encoder and, unlike the bias,
the gate and the reader, opening the attention across costs the bi-encoder's score nothing: the
two-mean cosine, which every other head keeps, rises for every candidate alike when the two
texts read each other (what held the bias and gate shut); here reading across has no score to
lose, only the residual to earn (residual learning on a first-stage ranker, as score
interpolation with the retriever does for rerankers).
Every candidate costs a full forward pass: the most accurate and the slowest scorer.
Models migrated from ParlAI's transformer/crossencoder keep the candidate's start token
(``keep_candidate_start``), as ParlAI's ``concat_without_padding`` does.
"""
import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .config import ModelConfig
from .encoder import TextEncoder
from .pooling import Pooling


CROSS_HEADS = ("linear", "segment-cosine", "reader", "residual")
INITIAL_COSINE_SCALE = 20.0  # sentence-transformers' scale for in-batch negatives
# The segment bias is stored divided by this: Adam moves a parameter about lr per update in its
# own units, so opening a bias of -8 at lr 5e-5 would take 160,000 updates; stored /1000, it
# moves up to 0.05 per update, and a few hundred updates can open it where that helps.
SEGMENT_BIAS_UNIT = 1000.0
# The segment gates likewise: stored /100, Adam moves a gate up to 1e-3 per update at lr 1e-5.
SEGMENT_GATE_UNIT = 100.0
# The reader's and the residual's head weights likewise: from 0, at lr 1e-5 they would add
# under a logit in 600 updates.
READER_HEAD_UNIT = 100.0
RESIDUAL_HEAD_UNIT = 100.0
READER_SEGMENT = 2  # the reader's segment id: neither text's
BLOCKED = -1e4  # an attention logit no token reads past (e^-1e4 is 0 in every float dtype)
NEEDS_SEGMENT_COSINE = (
    "--cross-segment-attention-bias and --cross-segment-gate start the cross-encoder as a "
    "bi-encoder, whose score is the segment-cosine head's: use them with --cross-head segment-cosine."
)
BIAS_OR_GATE = (
    "--cross-segment-attention-bias and --cross-segment-gate are two ways to open the attention "
    "across the pair: give one of them."
)


@dataclass
class CrossEncoderConfig(ModelConfig):
    """A cross-encoder: its head, its pair layout (``cross_candidate_start``: the candidate
    keeps its [CLS], as ParlAI's models were trained) and the start of its segment bias."""

    kind: ClassVar[str] = "cross"
    reduction_type: str = "first"
    cross_head: str = "linear"
    cross_segment_attention_bias: Optional[float] = None
    cross_segment_gate: Optional[float] = None
    cross_candidate_start: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_head(self.cross_head, self.cross_segment_attention_bias, self.cross_segment_gate)


def check_head(head: str, segment_attention_bias: Optional[float], segment_gate: Optional[float]) -> None:
    """ValueError naming the option, for a head and a two-text layout that do not go together."""
    if head not in CROSS_HEADS:
        raise ValueError(f"--cross-head {head}: choose one of {CROSS_HEADS}")
    if segment_attention_bias is not None and segment_gate is not None:
        raise ValueError(BIAS_OR_GATE)
    if (segment_attention_bias is not None or segment_gate is not None) and head != "segment-cosine":
        raise ValueError(NEEDS_SEGMENT_COSINE)


class CrossEncoderModule(nn.Module):
    @classmethod
    def from_config(cls, config: CrossEncoderConfig, encoder: TextEncoder, candidate_encoder=None):
        return cls(
            encoder, config.reduction_type, config.cross_head, config.cross_segment_attention_bias,
            config.cross_segment_gate,
        )

    def __init__(
        self, encoder: TextEncoder, reduction: str = "first", head: str = "linear", segment_attention_bias=None,
        segment_gate=None,
    ):
        super().__init__()
        check_head(head, segment_attention_bias, segment_gate)
        self.encoder = encoder
        self.head = head
        self.two_texts = segment_attention_bias is not None or segment_gate is not None or head in ("reader", "residual")
        if segment_attention_bias is not None:
            heads = encoder.backbone.config.num_attention_heads
            self.segment_bias = nn.Parameter(torch.full((heads,), segment_attention_bias / SEGMENT_BIAS_UNIT))
        if segment_gate is not None:
            shape = (encoder.backbone.config.num_hidden_layers, encoder.backbone.config.num_attention_heads)
            self.segment_gate = nn.Parameter(torch.full(shape, segment_gate / SEGMENT_GATE_UNIT))
        if head == "linear":
            self.pooling = Pooling(reduction)
            self.classifier = nn.Linear(encoder.dim, 1)
        else:
            self.pooling = Pooling("mean")
        if head in ("segment-cosine", "reader"):
            self.log_scale = nn.Parameter(torch.tensor(math.log(INITIAL_COSINE_SCALE)))
        if head == "reader":
            self.reader_head = nn.Parameter(torch.zeros(encoder.dim))  # w / READER_HEAD_UNIT
        if head == "residual":
            self.prior_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()  # h0: never trained
            self.register_buffer("prior_scale", torch.tensor(INITIAL_COSINE_SCALE))  # s0: the bi-encoder's
            self.residual_head = nn.Parameter(torch.zeros(encoder.dim))  # w / RESIDUAL_HEAD_UNIT

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "prior_encoder"):
            self.prior_encoder.eval()  # the frozen bi-encoder scores without dropout, always
        return self

    def forward(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """pairs ids [P, L], segments [P, L] -> scores [P]"""
        if self.head == "reader":
            return self.score_with_reader(ids, segments)
        if self.head == "residual":
            return self.score_with_residual(ids, segments)
        if self.two_texts:
            hidden, mask = self.encode_as_two_texts(ids, segments)
        else:
            hidden, mask = self.encoder(ids, segments)  # [P, L, d], [P, L]
        if self.head == "linear":
            return self.classifier(self.pooling(hidden, mask)).squeeze(-1)
        return self.segment_cosine(hidden, mask, segments)

    def segment_cosine(self, hidden, mask, segments, scale=None) -> torch.Tensor:
        """hidden [P, L, d], mask, segments [P, L] -> s * cos of the context's and the
        candidate's mean outputs [P]; s is ``scale``, else the learned one."""
        context = self.pooling(hidden, mask & (segments == 0))  # [P, d]
        candidate = self.pooling(hidden, mask & (segments == 1))  # [P, d]
        scale = self.log_scale.exp() if scale is None else scale
        return scale * nn.functional.cosine_similarity(context, candidate, dim=-1)

    def score_with_reader(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """pairs ids, segments [P, L] (two-text layout) -> scores [P]; see the module's docstring."""
        ids = torch.cat([ids[:, :1], ids], 1)  # [P, 1 + L]: the reader, a copy of the [CLS], in front
        segments = torch.cat([segments.new_full((ids.size(0), 1), READER_SEGMENT), segments], 1)
        reader = segments == READER_SEGMENT  # [P, 1 + L]
        across = segments[:, :, None] != segments[:, None, :]  # [P, 1 + L, 1 + L]
        blocked = across & ~reader[:, :, None]  # each text reads itself; the reader reads all
        bias = torch.zeros(blocked.shape, device=ids.device).masked_fill(blocked, BLOCKED)[:, None]
        positions = self.two_text_positions(ids[:, 1:], segments[:, 1:])  # [P, L]
        positions = torch.cat([positions.new_zeros(ids.size(0), 1), positions], 1)
        hidden, mask = self.encoder(ids, torch.zeros_like(segments), positions, bias)  # [P, 1 + L, d]
        read_across = hidden[:, 0] @ self.reader_head * READER_HEAD_UNIT  # [P]
        return self.segment_cosine(hidden, mask, segments) + read_across

    def score_with_residual(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """pairs ids, segments [P, L] (two-text layout) -> scores [P]; see the module's docstring."""
        with torch.no_grad():
            positions = self.two_text_positions(ids, segments)  # [P, L]
            across = segments[:, :, None] != segments[:, None, :]  # [P, L, L]
            blocked = torch.zeros(across.shape, device=ids.device).masked_fill(across, BLOCKED)[:, None]
            apart, mask = self.prior_encoder(ids, torch.zeros_like(segments), positions, blocked)  # [P, L, d]
            prior = self.segment_cosine(apart, mask, segments, self.prior_scale)  # [P]
        hidden, mask = self.encoder(ids, segments)  # [P, L, d]: full attention, token types mark the texts
        return prior + self.pooling(hidden, mask) @ self.residual_head * RESIDUAL_HEAD_UNIT

    def two_text_positions(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """ids, segments [P, L] -> positions [P, L] counted from 0 in each text."""
        candidate_start = ((segments == 0) & (ids != self.encoder.pad_idx)).sum(1, keepdim=True)  # [P, 1]
        pos = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)  # [1, L]
        return torch.where(pos < candidate_start, pos, pos - candidate_start)

    def encode_as_two_texts(self, ids: torch.Tensor, segments: torch.Tensor):
        """ids, segments [P, L] -> hidden [P, L, d], mask [P, L]; see the module's docstring."""
        positions = self.two_text_positions(ids, segments)  # [P, L]
        across = segments[:, :, None] != segments[:, None, :]  # [P, L, L]
        if hasattr(self, "segment_gate"):
            gates = self.segment_gate * SEGMENT_GATE_UNIT  # [layers, heads]
            return self.encoder(ids, torch.zeros_like(segments), positions, two_text_gates=(across, gates))
        bias = self.segment_bias * SEGMENT_BIAS_UNIT  # [heads]
        dtype = next(self.encoder.parameters()).dtype
        attention_bias = across[:, None].to(dtype) * bias.to(dtype)[None, :, None, None]  # [P, heads, L, L]
        return self.encoder(ids, torch.zeros_like(segments), positions, attention_bias)

    @staticmethod
    def pair_inputs(
        context_ids, candidate_ids, context_index, candidate_index, pad_idx, keep_candidate_start=False
    ):
        """Join right-padded contexts [B, T] and candidates [M, L] into P pairs.

        Pair p is context ``context_index[p]`` ([CLS] x [SEP]) followed by candidate
        ``candidate_index[p]`` without its leading [CLS] (y [SEP]; with it when
        ``keep_candidate_start``), padded only to the longest pair. Returns ids [P, Lp] and
        segment ids [P, Lp].
        """
        ctx = context_ids[context_index]  # [P, T]
        cand = candidate_ids[candidate_index]  # [P, L]
        ctx_len = (ctx != pad_idx).sum(1, keepdim=True)  # [P, 1]
        cand_len = (cand != pad_idx).sum(1, keepdim=True).clamp(min=1)
        skip = 0 if keep_candidate_start else 1  # leading candidate tokens left out
        total = ctx_len + cand_len - skip
        pos = torch.arange(int(total.max()), device=ctx.device).unsqueeze(0)  # [1, Lp]
        from_context = pos < ctx_len
        ctx_tok = ctx.gather(1, pos.clamp(max=ctx.size(1) - 1).expand(ctx.size(0), -1))
        cand_pos = (pos - ctx_len + skip).clamp(0, cand.size(1) - 1)
        ids = torch.where(from_context, ctx_tok, cand.gather(1, cand_pos))
        valid = pos < total
        ids = ids.masked_fill(~valid, pad_idx)
        segments = (~from_context & valid).long()
        return ids, segments


def pair_lengths(context_ids, candidate_ids, context_index, candidate_index, pad_idx) -> torch.Tensor:
    """[P] real tokens of each pair (before the join drops the candidate's start token)."""
    return (context_ids != pad_idx).sum(1)[context_index] + (candidate_ids != pad_idx).sum(1)[candidate_index]


def score_pairs(
    forward, context_ids, candidate_ids, context_index, candidate_index, pad_idx, keep_candidate_start=False,
    pairs_per_pass=None,
) -> torch.Tensor:
    """Scores [P] of the pairs (as ``pair_inputs`` joins them) through ``forward`` (the module,
    or what wraps it for distributed training), longest pairs first, in passes of
    ``pairs_per_pass`` (None: one pass), each padded only to its own longest pair."""
    lengths = pair_lengths(context_ids, candidate_ids, context_index, candidate_index, pad_idx)
    order = lengths.argsort(descending=True)
    if not len(order):
        return context_ids.new_zeros(0, dtype=torch.float)
    sorted_scores = []
    for chunk in order.split(pairs_per_pass or len(order)):
        ids, segments = CrossEncoderModule.pair_inputs(
            context_ids, candidate_ids, context_index[chunk], candidate_index[chunk], pad_idx, keep_candidate_start
        )
        sorted_scores.append(forward(ids, segments))
    scores = torch.cat(sorted_scores)
    return torch.empty_like(scores).index_put((order,), scores)
