"""A bi- or poly-encoder agent's fixed candidates, encoded once and never silently stale.

For --eval-candidates fixed (and interactive mode) the candidates of one file are tokenized
and encoded through ``parlai_poly.candidate_store``: a safetensors cache beside the model
file (or in --candidate-cache-dir) that is reused only when the candidate file, the
tokenizer, the candidate encoder's weights and the encoding options all match (``key``),
instead of ParlAI's pickled ``.vecs``/``.encs`` files keyed by file
name only. The agent keeps ParlAI's own attributes (``fixed_candidates``,
``fixed_candidate_vecs``, ``fixed_candidate_encs``) and asks this object to fill them.

``fixed_candidate_encs`` is always the float32 encodings (memory-mapped from the store); with
--candidate-store-dtype bfloat16 or int8 the store also holds the compact copy that scoring
reads (``stored_for``), and the float32 rows are read only where the top is rescored.
"""
from typing import Optional, Tuple

import torch
from parlai.utils import logging

from ..candidate_file import read_candidate_file
from .. import precision
from ..candidate_store import CandidateStore, CandidateVectors, dictionary_sha256, module_sha256
from ..errors import ParlaiPolyError
from ..modules.stored import StoredCandidates
from ..storage import sha256_file


class FixedCandidates:
    """One candidate file of one agent: its texts, token ids and (cached) encodings.

    ``rebuild`` (--fixed-candidate-vecs replace) makes the first encoding ignore the cache."""

    def __init__(self, agent, path: str, rebuild: bool = False):
        self.agent = agent
        self.path = path
        self.texts = read_candidate_file(path)
        logging.info(f"Loading fixed candidate set from {path} (n = {len(self.texts)})")
        opt = agent.opt
        prefix = CandidateStore.location(opt.get("model_file"), path, opt.get("candidate_cache_dir"))
        self.store = CandidateStore(prefix, self.store_dtype(agent, len(self.texts)))
        self.rebuild = rebuild
        self._vectors: Optional[CandidateVectors] = None  # tokenized only when needed
        # what ``encoded`` last gave: the float32 encodings and the copy scoring reads
        self.exact: Optional[torch.Tensor] = None
        self.stored: Optional[StoredCandidates] = None

    @staticmethod
    def store_dtype(agent, num_candidates: int) -> str:
        """--candidate-store-dtype for this set: 'float32', 'bfloat16' or 'int8'."""
        try:
            return precision.resolve_store_dtype(
                agent.opt.get("candidate_store_dtype") or "auto", agent.use_cuda, num_candidates
            )
        except ValueError as e:
            raise ParlaiPolyError(str(e)) from None

    def __len__(self) -> int:
        return len(self.texts)

    def vectors(self) -> CandidateVectors:
        if self._vectors is None:
            self._vectors = CandidateVectors.from_texts(self.texts, self.agent.vectorize_fixed_candidates)
        return self._vectors

    def padded(self) -> torch.Tensor:
        """[N, L] int32 token ids, padded: what ParlAI compares labels with."""
        return self.vectors().padded(self.agent.NULL_IDX)

    def key(self) -> dict:
        """Everything the cached vectors and encodings depend on (see candidate_store)."""
        agent, opt = self.agent, self.agent.opt
        model = agent.unwrapped_model
        encoder = model.candidate_encoder if model.candidate_encoder is not None else model.context_encoder
        config = encoder.backbone.config
        key = {
            "agent": agent.agent_name,
            "candidate_file_sha256": sha256_file(self.path),
            "num_candidates": len(self.texts),
            "tokenizer_sha256": dictionary_sha256(agent.dict),
            "special_ids": [agent.NULL_IDX, agent.START_IDX, agent.END_IDX],
            "label_truncate": agent.label_truncate,
            "label_truncation": opt.get("label_truncation"),
            "weights_sha256": module_sha256(encoder),
            "hf_model": opt.get("hf_model"),
            "backbone": f"{config.model_type} hidden={config.hidden_size} "
            f"layers={getattr(config, 'num_hidden_layers', None)}",
            "reduction_type": opt["reduction_type"],
            "reduction_first_m": opt["reduction_first_m"],
            "share_encoders": opt["share_encoders"],
            "precision": agent.precision,
        }
        if model.similarity != "dot":  # unit vectors; absent for dot, so older caches stay valid
            key["similarity"] = model.similarity
        mlp = getattr(model, "candidate_mlp", None)
        if mlp is not None:  # part of every candidate's encoding (bi-encoders migrated from ParlAI)
            key["candidate_mlp_sha256"] = module_sha256(mlp)
        return key

    def encoded(self, encode, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(vecs [N, L], encs [N, d] float32) from the store: reused while valid, else built
        with ``encode`` (ids [n, l] -> [n, d]) under the model's eval mode. ``device``: where
        the encodings (and the store's compact copy) are to be scored, if not the CPU."""
        agent = self.agent
        model = agent.model
        was_training = model.training
        model.eval()
        try:
            result = self.store.get(
                self.key(),
                self._vectors if self._vectors is not None else self.vectors,
                encode,
                agent.NULL_IDX,
                agent.opt.get("encode_candidate_vecs_batchsize", 256),
                rebuild=self.rebuild,
                info={"candidate_file": self.path, "model_file": agent.opt.get("model_file")},
            )
        finally:
            model.train(was_training)
        self.rebuild = False  # 'replace' rebuilds once per run, not on every reload
        vecs, exact, stored = result
        if device is not None and torch.device(device).type != "cpu":
            exact = exact.to(device)
            # a float32 store's values are the float32 encodings: one copy on the device
            stored = stored.to(device) if stored.low_precision else StoredCandidates(exact)
        self.exact, self.stored = exact, stored
        return vecs, exact

    def holds(self, cands: torch.Tensor) -> bool:
        """Whether ``cands`` are the float32 encodings ``encoded`` gave (the same memory, as
        ParlAI passes its fixed_candidate_encs: maybe a detached view of them)."""
        exact = self.exact
        return (
            exact is not None
            and cands.dim() == 2
            and cands.shape == exact.shape
            and cands.device == exact.device
            and cands.data_ptr() == exact.data_ptr()
        )

    def stored_for(self, cands: torch.Tensor) -> Optional[StoredCandidates]:
        """The store's bfloat16 or int8 copy of ``cands``, when they are this set's float32
        encodings from the store; None for a float32 store or any other encodings (those
        made in memory after training, for one)."""
        if self.stored is None or not self.stored.low_precision or not self.holds(cands):
            return None
        return self.stored
