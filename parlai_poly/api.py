"""Rank candidates from Python, without ParlAI's world loop.

    from parlai_poly import Ranker

    ranker = Ranker.load("zoo:parlai_poly/ccc_poly16/model")   # or any model file of ours
    ranker.rank("do you like pizza?", ["yes, with cheese", "it rained all day"], top_k=1)
    # -> [("yes, with cheese", 17.3)]

``Ranker`` drives the agent the model file was saved by (bi, poly or cross) exactly as
ParlAI's batch world does: one shared copy of the agent observes each context, and one
``batch_act`` scores a batch of them, so the scores are those ``parlai eval_model`` computes
(same tokenization, truncation, precision). A bi- or poly-encoder encodes each distinct
candidate once while its weights stay the same, so ranking many contexts against the same
candidates, or ranking them again, does not encode them again.
"""
from typing import List, Optional, Sequence, Tuple

import torch

Ranked = List[Tuple[str, float]]


class Ranker:
    """A loaded model that ranks candidates for contexts. Build it with ``Ranker.load``."""

    def __init__(self, agent):
        self.agent = agent
        self._copies: list = []

    @classmethod
    def load(cls, model_file: str, **options) -> "Ranker":
        """Load a model file of ours, or a ``zoo:parlai_poly/<entry>/model`` path (installed on
        first use into ``datapath``, as from the ``parlai`` command). ``options`` override the
        file's own, as on the command line (``precision="fp32"``, ``datapath="data"``, ...)."""
        from .loading import load_agent

        overrides = dict(options, return_cand_scores=True, eval_candidates="inline", datatype="valid")
        return cls(load_agent(model_file, overrides))

    @property
    def kind(self) -> str:
        """'bi', 'poly' or 'cross': the agent that saved the model."""
        return self.agent.agent_name

    def rank(self, context: str, candidates: Sequence[str], top_k: Optional[int] = None) -> Ranked:
        """``candidates`` ordered best first for ``context`` (turns joined by newlines), as
        (candidate, score) pairs; the first ``top_k`` only, if given."""
        return self.rank_batch([context], [candidates], top_k)[0]

    def rank_batch(
        self,
        contexts: Sequence[str],
        candidates: Sequence[Sequence[str]],
        top_k: Optional[int] = None,
        batch_size: int = 32,
    ) -> List[Ranked]:
        """``rank`` for many contexts, each with its own candidates, ``batch_size`` at a time."""
        if len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidate lists")
        ranked: List[Ranked] = []
        for start in range(0, len(contexts), batch_size):
            chunk = list(zip(contexts[start : start + batch_size], candidates[start : start + batch_size]))
            ranked.extend(self._rank_chunk(chunk, top_k))
        return ranked

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Candidate-side encodings [N, d] of ``texts`` (bi- and poly-encoders): what the
        model caches for candidates, float32, in the order given."""
        if self.kind == "cross":
            raise ValueError("a cross-encoder reads each candidate with its context: it has no candidate encodings")
        vecs = self.agent.vectorize_fixed_candidates(list(texts))
        padded = torch.full((len(vecs), max(len(v) for v in vecs)), self.agent.NULL_IDX, dtype=torch.long)
        for i, vec in enumerate(vecs):
            padded[i, : len(vec)] = torch.as_tensor(vec)
        was_training = self.agent.model.training
        self.agent.model.eval()
        try:
            return torch.cat([self.agent.encode_candidate_batch(padded[i : i + batch_size]) for i in range(0, len(padded), batch_size)])
        finally:
            self.agent.model.train(was_training)

    def _rank_chunk(self, chunk, top_k) -> List[Ranked]:
        while len(self._copies) < len(chunk):
            self._copies.append(self.agent.clone())
        observations = []
        for copy, (context, cands) in zip(self._copies, chunk):
            if not cands:
                raise ValueError(f"no candidates to rank for context {context[:60]!r}")
            copy.reset()
            observations.append(copy.observe({"text": context, "label_candidates": list(cands), "episode_done": True}))
        replies = self.agent.batch_act(observations)
        out = []
        for reply, (_, cands) in zip(replies, chunk):
            k = len(cands) if top_k is None else min(top_k, len(cands))
            scores = reply["sorted_scores"].tolist()
            out.append(list(zip(reply["text_candidates"][:k], scores[:k])))
        return out
