"""A Hugging Face encoder that takes ParlAI's padded token ids."""
import copy
from typing import Optional

import torch
from torch import nn

from ..precision import autocast
from .dropout import FAST_ATTENTION, use_fast_dropout


class TextEncoder(nn.Module):
    """ids [B, T] -> last hidden states [B, T, d] and the attention mask [B, T].

    ``compute_dtype`` (set by the agents' --precision): the dtype the backbone's products run
    in under autocast; None is float32. The outputs are float32 either way, so everything
    after the backbone (pooling, attention over codes, scores, losses) stays float32.
    Without gradients (evaluation, caches, serving) a copy of the backbone with its weights in
    ``compute_dtype`` runs instead, made again whenever a weight changes: on a CPU autocast
    casts every weight at every call and keeps the layer norms and the residual stream in
    float32 (here 1.1x the copy's time for 32 MiniLM contexts, 1.3-1.6x for one).
    ``whole_backbone_in_compute_dtype`` (set by --precision bf16-full): training runs the
    backbone wholly in ``compute_dtype`` as well, its trainable weights cast once per step
    (differentiably: their gradients arrive in float32, where the optimizer keeps them) and
    its layer norms and residual stream in that dtype: no autocast casts at every product
    (MiniLM training steps 1.03-1.14x faster than under autocast, bf16 on 2 cores).
    The backbone's dropout draws its masks the cheap way (``dropout.py``).

    ``length_groups`` (set by the agents' --length-groups): a batch's rows are encoded in up to
    this many groups of similar length, each padded only to its own longest, and put back in
    their places: the same outputs as one padded batch (a row never attends to padding), at the
    padded cost of a length-sorted batch, so batches can stay random (batch negatives drawn
    from the whole task) without paying for a random batch's padding.
    """

    def __init__(self, backbone: nn.Module, pad_idx: int, freeze_embeddings: bool = True):
        super().__init__()
        self.backbone = use_fast_dropout(backbone)
        self.pad_idx = pad_idx
        self.dim = backbone.config.hidden_size
        self.max_positions = backbone.config.max_position_embeddings
        self.num_segments = getattr(backbone.config, "type_vocab_size", 1)
        self.compute_dtype: Optional[torch.dtype] = None
        self.length_groups = 1
        self.whole_backbone_in_compute_dtype = False
        self._low_precision_copy = None  # (weights' identity and versions, backbone in compute_dtype)
        self._frozen_casts = {}  # name -> (identity and version, weight in compute_dtype)
        if freeze_embeddings:
            # the Poly-encoder paper's best setting: fine-tune all layers but the embeddings
            embeddings = getattr(backbone, "embeddings", None) or backbone.get_input_embeddings()
            for p in embeddings.parameters():
                p.requires_grad_(False)

    def forward(self, ids: torch.Tensor, segments: torch.Tensor = None, positions=None, attention_bias=None, two_text_gates=None):
        """ids [B, T] -> hidden [B, T, d] (float32), mask [B, T]; in ``length_groups`` when asked
        and nothing per pair (``attention_bias``, ``two_text_gates``) is given. ``positions``
        [B, T]: position ids (default 0..T-1); ``attention_bias`` [B, heads, T, T]: added to the
        attention logits of every layer, padding keys excluded; ``two_text_gates`` (across
        [B, T, T] bool, gates [layers, heads]): each layer's attention over a pair of texts
        (``dropout.two_text_weights``), for backbones that run ``FAST_ATTENTION``."""
        mask = ids != self.pad_idx  # [B, T]
        per_pair = attention_bias is not None or two_text_gates is not None
        if self.length_groups > 1 and not per_pair and ids.size(0) > 1:
            return self._encode_in_length_groups(ids, mask, segments, positions), mask
        return self._encode(ids, mask, segments, positions, attention_bias, two_text_gates), mask

    def _encode_in_length_groups(self, ids, mask, segments, positions) -> torch.Tensor:
        """hidden [B, T, d]: rows sorted by extent, encoded group by group, each group cut to
        its widest row; the padding past it is zeros, masked out as all padding is."""
        one_based = torch.arange(1, ids.size(1) + 1, device=ids.device)  # [T]
        extents = (mask * one_based).amax(-1)  # [B] one past each row's last token
        order = extents.argsort(descending=True)
        groups = []
        for rows in order.tensor_split(min(self.length_groups, ids.size(0))):
            width = max(int(extents[rows[0]]), 1)  # rows are sorted: the first is the widest
            cut = lambda t: None if t is None else t[rows, :width]  # noqa: E731
            encoded = self._encode(ids[rows, :width], mask[rows, :width], cut(segments), cut(positions))
            groups.append(nn.functional.pad(encoded, (0, 0, 0, ids.size(1) - width)))  # [b, T, d]
        return torch.cat(groups)[order.argsort()]  # back in the batch's order

    def _encode(self, ids, mask, segments=None, positions=None, attention_bias=None, two_text_gates=None) -> torch.Tensor:
        """hidden [B, T, d] in float32, the backbone run on ids [B, T] as they are."""
        kwargs = {"input_ids": ids, "attention_mask": mask.long()}
        if positions is not None:  # only when given: not every Hugging Face encoder takes position ids
            kwargs["position_ids"] = positions
        if segments is not None and self.num_segments > 1:
            kwargs["token_type_ids"] = segments
        if attention_bias is not None:
            # a 4D mask reaches every layer's attention as is (transformers' masking_utils)
            padding = torch.zeros_like(attention_bias[:, :1, :1, :]).masked_fill(
                ~mask[:, None, None, :], torch.finfo(attention_bias.dtype).min
            )  # [B, 1, 1, T]
            kwargs["attention_mask"] = attention_bias + padding
        if two_text_gates is not None:
            if getattr(self.backbone.config, "_attn_implementation", None) != FAST_ATTENTION:
                raise ValueError(
                    f"gated attention across a pair needs a backbone whose attention runs through "
                    f"transformers' attention interface (BERT-like, SDPA); this one runs "
                    f"{getattr(self.backbone.config, '_attn_implementation', None)!r}"
                )
            across, gates = two_text_gates
            kwargs["two_text_gates"] = (across[:, None], gates)  # reaches every layer's attention
        return self._run_backbone(ids.device.type, kwargs)

    def _run_backbone(self, device_type: str, kwargs: dict) -> torch.Tensor:
        """hidden [B, T, d] in float32: under autocast while gradients are kept, else (and in
        training too with ``whole_backbone_in_compute_dtype``) on the backbone's copy in
        compute_dtype."""
        training = torch.is_grad_enabled()
        if self.compute_dtype is None or (training and not self.whole_backbone_in_compute_dtype):
            with autocast(device_type, self.compute_dtype):
                return self.backbone(**kwargs).last_hidden_state.float()
        if kwargs["attention_mask"].is_floating_point():  # SDPA takes a float mask in the queries' dtype only
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.compute_dtype)
        if training:
            weights = self._weights_in_compute_dtype()
            return torch.func.functional_call(self._low_precision_backbone(), weights, (), kwargs).last_hidden_state.float()
        return self._low_precision_backbone(current=True)(**kwargs).last_hidden_state.float()

    def _weights_in_compute_dtype(self) -> dict:
        """{name: weight in compute_dtype} of every backbone weight: the trainable ones cast
        now, inside the graph, so their gradients reach the float32 weights; the frozen ones
        cast once and kept until they change."""
        weights = {}
        for name, weight in self.backbone.named_parameters():
            if weight.requires_grad:
                weights[name] = weight.to(self.compute_dtype)
                continue
            key = (weight.data_ptr(), weight._version, self.compute_dtype)
            if self._frozen_casts.get(name, (None,))[0] != key:
                self._frozen_casts[name] = (key, weight.detach().to(self.compute_dtype))
            weights[name] = self._frozen_casts[name][1]
        return weights

    def _low_precision_backbone(self, current: bool = False) -> nn.Module:
        """The backbone with its weights in compute_dtype; with ``current``, copied again when
        any weight was replaced or changed in place (its storage or version moved); without,
        any copy in compute_dtype will do (training passes it every weight). A module of its
        own, not a swap of weights in and out, so threads may run it at once."""
        weights = list(self.backbone.parameters())
        key = (self.compute_dtype,) + tuple((w.data_ptr(), w._version) for w in weights)
        kept = self._low_precision_copy
        if kept is None or (kept[0] != key if current else kept[0][0] != self.compute_dtype):
            backbone = copy.deepcopy(self.backbone).to(self.compute_dtype).requires_grad_(False)
            self._low_precision_copy = (key, backbone)  # in a tuple: not a submodule, not saved
        backbone = self._low_precision_copy[1]
        if backbone.training != self.backbone.training:  # dropout or not, as the original's mode says
            backbone.train(self.backbone.training)
        return backbone
