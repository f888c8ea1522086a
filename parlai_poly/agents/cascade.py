"""Retrieve and rerank: bi-encoder top-K -> poly-encoder -> optionally cross-encoder.

Over a large fixed candidate set the bi-encoder is the cheapest scorer (one product with the
cached candidates), the poly-encoder more accurate at a little more cost, the cross-encoder
the most accurate at a forward pass per candidate. The cascade spends each where it pays:
the bi-encoder keeps --retrieve-top-k candidates, the poly-encoder orders those, and the
cross-encoder reorders the best --rerank-top-k of them. A cross-encoder agent given
--retrieve-model-file uses the retriever alone and orders its top K itself.

The bi-encoder's top K is exact by default (--retrieve-index exact: every candidate scored),
or found through an HNSW graph over its cached encodings (--retrieve-index hnsw, faiss), which
pays from about a million candidates on; see ``parlai_poly.retrieval_index``. With hnsw the
candidates it did not retrieve have no retrieval score: they all tie below the ranked ones,
so rank and MRR count a label among them as a random draw.

The retriever keeps the fixed candidates as this agent's --candidate-store-dtype says, and
rescores its --retrieve-top-k in float32; the HNSW index is built over the float32
encodings, so it does not depend on the store's dtype.
"""
import torch
from parlai.utils import logging

from ..candidate_store import dictionary_sha256
from .. import ranking
from ..errors import ParlaiPolyError
from ..loading import load_agent
from ..retrieval_index import HnswIndexStore, import_faiss, search

RETRIEVE_INDEXES = ("exact", "hnsw")


def add_retrieve_args(group, orders: str, top_k: int):
    """--retrieve-model-file and --retrieve-top-k (default ``top_k``) for an agent that then
    ``orders`` the retrieved candidates (help text), and the index options."""
    group.add_argument(
        "--retrieve-model-file",
        type=str,
        default=None,
        help=f"A bi-encoder model file: it picks --retrieve-top-k fixed candidates (from its cached "
        f"encodings), which {orders}.",
    )
    group.add_argument("--retrieve-top-k", type=int, default=top_k)
    add_retrieve_index_args(group)


def add_retrieve_index_args(group):
    group.add_argument(
        "--retrieve-index",
        type=str,
        default="exact",
        choices=RETRIEVE_INDEXES,
        help="How the bi-encoder finds its top K: exact (scores every candidate) or hnsw (a "
        "faiss HNSW graph over its cached encodings, built once and cached beside them; "
        "approximate, for 1M+ candidates).",
    )
    group.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (faiss M).")
    group.add_argument(
        "--hnsw-ef-search",
        type=int,
        default=128,
        help="HNSW candidates explored per search (at least --retrieve-top-k): higher, better "
        "recall and slower.",
    )
    group.add_argument(
        "--hnsw-ef-construction", type=int, default=40, help="HNSW candidates explored per insertion when building."
    )


def check_retrieve_options(opt):
    if not opt.get("retrieve_model_file"):
        return
    for name in ("retrieve_top_k", "hnsw_m", "hnsw_ef_search", "hnsw_ef_construction"):
        if opt.get(name, 1) < 1:
            flag = "--" + name.replace("_", "-")
            raise ParlaiPolyError(f"{flag} {opt[name]}: must be at least 1.")
    if opt.get("retrieve_index") == "hnsw":
        import_faiss()  # a missing faiss is an error now, not after loading three models


class RetrieveAndRerank:
    def __init__(self, agent):
        opt = agent.opt
        self.retrieve_top_k = opt["retrieve_top_k"]
        self.rerank_top_k = opt.get("rerank_top_k", 0)  # a cross-encoder agent reranks itself
        # the retriever keeps the same fixed candidates as this agent does, and its top K is read
        store = dict(candidate_store_dtype=opt.get("candidate_store_dtype") or "auto",
                     rescore_top_k=self.retrieve_top_k)
        self.retriever = self._load(agent, opt["retrieve_model_file"], "bi", "--retrieve-model-file", **store)
        self.reranker = None
        if opt.get("rerank_model_file"):
            self.reranker = self._load(agent, opt["rerank_model_file"], "cross", "--rerank-model-file")
        self.ef_search = opt.get("hnsw_ef_search", 128)
        self.index = self._hnsw_index(opt) if opt.get("retrieve_index", "exact") == "hnsw" else None

    def _hnsw_index(self, opt):
        """The HNSW index over the retriever's cached encodings, keyed like its cache."""
        bi = self.retriever
        store = bi.candidate_store
        key = getattr(store, "key", None) or bi.fixed.key()
        prefix = getattr(store, "prefix", None)  # None: no cache on disk, nor an index
        self.index_store = HnswIndexStore(prefix, opt["hnsw_m"], opt["hnsw_ef_construction"])
        return self.index_store.get(key, bi.fixed_candidate_encs)

    @staticmethod
    def _load(agent, model_file, kind, option, **extra):
        overrides = dict(
            eval_candidates="fixed",
            fixed_candidates_path=agent.fixed_candidates_path,
            interactive_mode=False,
            datatype="valid",
            datapath=agent.opt.get("datapath"),  # a zoo: path resolves where this agent's data is
            no_cuda=agent.opt.get("no_cuda", False),  # on this agent's device
            gpu=agent.opt.get("gpu", -1),
            **extra,
        )
        other = load_agent(model_file, overrides, kinds=(kind,), what=option)
        if dictionary_sha256(other.dict) != dictionary_sha256(agent.dict):
            raise ParlaiPolyError(
                f"{option} {model_file}: its backbone tokenizes differently from this model's; "
                "every model of a cascade must share one backbone vocabulary."
            )
        other.model.eval()
        return other

    def scores(self, agent, batch, cand_encs) -> torch.Tensor:
        """[B, N] scores whose order is the cascade's: reranked first, the rest by retrieval."""
        top, below = self.retrieve(batch)  # [B, K], [B, N]
        context = agent.unwrapped_model.encode_context(batch.text_vec)
        top = ranking.rerank_head(top, lambda picked: agent.score_encoded(context, cand_encs[picked]))
        if self.reranker is not None and self.rerank_top_k > 0:
            top = ranking.rerank_head(top, lambda head: self._cross_scores(batch, head), self.rerank_top_k)
        return ranking.cascade_scores(top, below)

    def retrieve(self, batch):
        """The retriever's top K [B, K], and scores [B, N] for everything below it: all
        under 1 (the ranked ones get K..1); in the retriever's order when exact."""
        bi = self.retriever
        encs = bi.fixed_candidate_encs
        context = bi.unwrapped_model.encode_context(batch.text_vec)  # [B, d]
        k = min(self.retrieve_top_k, encs.size(0))
        if self.index is not None:
            top = search(self.index, context, k, self.ef_search).to(encs.device)
            if bool((top >= 0).all()):
                return top, torch.zeros(top.size(0), encs.size(0), device=encs.device)
            logging.warning(f"The HNSW index returned fewer than {k} candidates; retrieving exactly for this batch.")
        retrieved = bi.score_encoded(context, encs)  # [B, N], from its store's copy (--candidate-store-dtype)
        top = retrieved.topk(k, dim=1).indices
        return top, retrieved - retrieved.max(1, keepdim=True).values - 1

    def hardest_of_random(self, context_ids, pool: int, k: int, exclude: torch.Tensor) -> torch.Tensor:
        """Indices [B, k] of fixed candidates: for each context of ``context_ids`` [B, T], the
        ``k`` of ``pool`` candidates drawn at random (without replacement) that the retriever
        scores highest, never the candidate ``exclude`` [B] names (its label; -1: none).
        Random pools, not the whole set: a candidate set's very best are often good answers
        too (false negatives), the best of a random draw are the confusions a ranking of
        random candidates meets."""
        bi = self.retriever
        encs = bi.fixed_candidate_encs  # [N, d]
        n = encs.size(0)
        with torch.no_grad():
            draws = torch.rand(context_ids.size(0), n, device=encs.device)
            drawn = draws.topk(min(pool, n), dim=1).indices  # [B, P] distinct, uniform
            context = bi.unwrapped_model.encode_context(context_ids)  # [B, d]
            scores = bi.unwrapped_model.score_encoded(context, encs[drawn])  # [B, P]
            scores = scores.masked_fill(drawn == exclude.to(drawn.device)[:, None], float("-inf"))
            top = scores.topk(min(k, drawn.size(1) - 1), dim=1).indices  # [B, k]
        return drawn.gather(1, top)

    def _cross_scores(self, batch, head):
        """The cross-encoder's scores [B, k] of each context's candidates ``head`` [B, k]."""
        return self.reranker.score_head(batch.text_vec, self.reranker.fixed_candidate_vecs, head)
