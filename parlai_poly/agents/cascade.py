"""Retrieve and rerank: bi-encoder top-K -> poly-encoder -> optionally cross-encoder.

Over a large fixed candidate set the bi-encoder is the cheapest scorer (one product with the
cached candidates), the poly-encoder more accurate at a little more cost, the cross-encoder
the most accurate at a forward pass per candidate. The cascade spends each where it pays:
the bi-encoder keeps --retrieve-top-k candidates, the poly-encoder orders those, and the
cross-encoder reorders the best --rerank-top-k of them.
"""
import torch
from parlai.core.agents import create_agent_from_model_file

from ..candidate_store import dictionary_sha256
from ..errors import ParlaiPolyError


class RetrieveAndRerank:
    def __init__(self, agent):
        opt = agent.opt
        self.retrieve_top_k = opt["retrieve_top_k"]
        self.rerank_top_k = opt["rerank_top_k"]
        self.retriever = self._load(agent, opt["retrieve_model_file"], "bi", "--retrieve-model-file")
        self.reranker = None
        if opt.get("rerank_model_file"):
            self.reranker = self._load(agent, opt["rerank_model_file"], "cross", "--rerank-model-file")

    @staticmethod
    def _load(agent, model_file, kind, option):
        overrides = dict(
            eval_candidates="fixed",
            fixed_candidates_path=agent.fixed_candidates_path,
            interactive_mode=False,
            datatype="valid",
        )
        other = create_agent_from_model_file(model_file, overrides)
        if getattr(other, "agent_name", None) != kind:
            raise ParlaiPolyError(f"{option} {model_file}: must be a parlai-poly {kind} model file.")
        if dictionary_sha256(other.dict) != dictionary_sha256(agent.dict):
            raise ParlaiPolyError(
                f"{option} {model_file}: its backbone tokenizes differently from this model's; "
                "every model of a cascade must share one backbone vocabulary."
            )
        other.model.eval()
        return other

    def scores(self, agent, batch, cand_encs) -> torch.Tensor:
        """[B, N] scores whose order is the cascade's: reranked first, the rest by retrieval."""
        bi = self.retriever
        retrieved = bi.unwrapped_model.score(bi.unwrapped_model.encode_context(batch.text_vec), bi.fixed_candidate_encs)
        top = retrieved.topk(min(self.retrieve_top_k, retrieved.size(1)), dim=1).indices  # [B, K]
        context = agent.unwrapped_model.encode_context(batch.text_vec)
        poly = agent.score_encoded(context, cand_encs[top])  # [B, K]
        top = top.gather(1, poly.argsort(1, descending=True))
        if self.reranker is not None and self.rerank_top_k > 0:
            top = self._rerank(batch, top)
        # everything below the top K keeps the retriever's order, under every reranked score
        final = retrieved - retrieved.max(1, keepdim=True).values - 1
        ranked = torch.arange(top.size(1), 0, -1, dtype=final.dtype).expand_as(top)
        return final.scatter(1, top, ranked)

    def _rerank(self, batch, top):
        bsz, k = top.size(0), min(self.rerank_top_k, top.size(1))
        head = top[:, :k]
        context_index = torch.arange(bsz).repeat_interleave(k)
        cross = self.reranker.score_pairs(batch.text_vec, self.reranker.fixed_candidate_vecs, context_index, head.reshape(-1))
        head = head.gather(1, cross.view(bsz, k).argsort(1, descending=True))
        return torch.cat([head, top[:, k:]], dim=1)
