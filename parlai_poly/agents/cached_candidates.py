"""Agents whose candidates are encoded apart from the context (bi and poly).

Their candidate vectors can be computed once and cached (--encode-candidate-vecs true, the
default), which TorchRankerAgent does for fixed and vocab candidates.
"""
import copy

import torch
from parlai.core.opt import Opt
from parlai.core.params import ParlaiParser

from .base import HuggingFaceRankerAgent


class CachedCandidateAgent(HuggingFaceRankerAgent):
    @classmethod
    def add_cmdline_args(cls, parser: ParlaiParser, partial_opt: Opt = None) -> ParlaiParser:
        super().add_cmdline_args(parser, partial_opt=partial_opt)
        parser.add_argument_group("parlai-poly dual encoder").add_argument(
            "--share-encoders",
            type="bool",
            default=True,
            help="One encoder for context and candidates; false: two, from the same weights.",
        )
        return parser

    def build_encoders(self):
        """(context encoder, candidate encoder or None when shared)"""
        context = self.build_text_encoder()
        return context, None if self.opt["share_encoders"] else copy.deepcopy(context)

    def encode_candidates(self, padded_cands: torch.Tensor) -> torch.Tensor:
        """[N, L] -> [N, d]; TorchRankerAgent calls this to cache fixed candidates."""
        return self.model.encode_candidates(padded_cands)

    def encode_candidate_batch(self, cand_vecs: torch.Tensor) -> torch.Tensor:
        """[N, L] -> [N, d] or [B, C, L] -> [B, C, d], in chunks when not training."""
        shape = cand_vecs.shape
        flat = cand_vecs.reshape(-1, shape[-1])
        if self.model.training:
            encs = self.model.encode_candidates(flat)
        else:
            step = self.opt.get("encode_candidate_vecs_batchsize", 256)
            encs = torch.cat([self.model.encode_candidates(flat[i : i + step]) for i in range(0, len(flat), step)])
        return encs.view(*shape[:-1], -1)

    def score_batch(self, batch, cand_vecs, cand_encs=None):
        context = self.model.encode_context(batch.text_vec)
        cands = cand_encs if cand_encs is not None else self.encode_candidate_batch(cand_vecs)
        return self.score_encoded(context, cands)

    def score_encoded(self, context, cands) -> torch.Tensor:
        raise NotImplementedError
