"""A Hugging Face encoder that takes ParlAI's padded token ids."""
from typing import Optional

import torch
from torch import nn

from ..precision import autocast
from .dropout import use_fast_dropout


class TextEncoder(nn.Module):
    """ids [B, T] -> last hidden states [B, T, d] and the attention mask [B, T].

    ``compute_dtype`` (set by the agents' --precision): the dtype the backbone's products run
    in under autocast; None is float32. The outputs are float32 either way, so everything
    after the backbone (pooling, attention over codes, scores, losses) stays float32.
    The backbone's dropout draws its masks the cheap way (``dropout.py``).
    """

    def __init__(self, backbone: nn.Module, pad_idx: int, freeze_embeddings: bool = True):
        super().__init__()
        self.backbone = use_fast_dropout(backbone)
        self.pad_idx = pad_idx
        self.dim = backbone.config.hidden_size
        self.max_positions = backbone.config.max_position_embeddings
        self.num_segments = getattr(backbone.config, "type_vocab_size", 1)
        self.compute_dtype: Optional[torch.dtype] = None
        if freeze_embeddings:
            # the Poly-encoder paper's best setting: fine-tune all layers but the embeddings
            embeddings = getattr(backbone, "embeddings", None) or backbone.get_input_embeddings()
            for p in embeddings.parameters():
                p.requires_grad_(False)

    def forward(self, ids: torch.Tensor, segments: torch.Tensor = None, positions=None, attention_bias=None):
        """``positions`` [B, T]: position ids (default 0..T-1); ``attention_bias``
        [B, heads, T, T]: added to the attention logits of every layer, padding keys excluded."""
        mask = ids != self.pad_idx  # [B, T]
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
        with autocast(ids.device.type, self.compute_dtype):
            hidden = self.backbone(**kwargs).last_hidden_state  # [B, T, d]
        return hidden.float(), mask
