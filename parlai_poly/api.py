"""Rank candidates from Python, without ParlAI's world loop.

    from parlai_poly import Ranker

    ranker = Ranker.load("zoo:parlai_poly/ccc_poly16/model")   # or any model file of ours
    ranker.rank("do you like pizza?", ["yes, with cheese", "it rained all day"], top_k=1)
    # -> [("yes, with cheese", 17.3)]

    # or against one fixed set of responses, encoded once (and cached beside the file)
    ranker = Ranker.load("zoo:parlai_poly/ccc_bi/model", fixed_candidates="responses.txt")
    ranker.rank("do you like pizza?", top_k=5)

``Ranker`` drives the agent the model file was saved by (bi, poly or cross) exactly as
ParlAI's batch world does: one shared copy of the agent observes each context, and one
``batch_act`` scores a batch of them, so the scores are those ``parlai eval_model`` computes
(same tokenization, truncation, precision). A bi- or poly-encoder encodes each distinct
candidate once while its weights stay the same, so ranking many contexts against the same
candidates, or ranking them again, does not encode them again. Fixed candidates go through
the agents' checked candidate cache, so a second ``Ranker.load`` with the same file and model
encodes nothing.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .errors import ParlaiPolyError

Ranked = List[Tuple[str, float]]


class Ranker:
    """A loaded model that ranks candidates for contexts. Build it with ``Ranker.load``."""

    def __init__(self, agent, has_fixed: bool = False):
        self.agent = agent
        self.has_fixed = has_fixed
        self._copies: list = []

    @classmethod
    def load(cls, model_file: str, fixed_candidates: Union[str, bool, None] = None, **options) -> "Ranker":
        """Load a model file of ours, or a ``zoo:parlai_poly/<entry>/model`` path (installed on
        first use into ``datapath``, as from the ``parlai`` command). ``options`` override the
        file's own, as on the command line (``precision="fp32"``, ``datapath="data"``, ...).

        ``fixed_candidates``: a file of candidates, one per line, that ``rank`` uses when it is
        given no candidates; ``True``: the model's own default responses (a zoo entry's
        ``responses.txt``)."""
        from .loading import load_agent

        # ParlAI's repeat blocking drops candidates from its text list but not from the
        # scores, which would no longer line up; a caller can filter the ranking itself
        overrides = dict(options, return_cand_scores=True, eval_candidates="inline", datatype="valid", repeat_blocking_heuristic=False)
        if fixed_candidates:
            overrides["eval_candidates"] = "fixed"
            if fixed_candidates is not True:
                overrides["fixed_candidates_path"] = fixed_candidates
        agent = load_agent(model_file, overrides)
        if fixed_candidates and not agent.fixed_candidates:
            raise ParlaiPolyError(f"{model_file}: it names no default responses; give fixed_candidates a file of candidates.")
        return cls(agent, has_fixed=bool(fixed_candidates))

    @property
    def fixed_candidates(self) -> List[str]:
        """The fixed candidates ``rank`` uses when given none (empty if loaded without)."""
        return list(self.agent.fixed_candidates or []) if self.has_fixed else []

    @property
    def kind(self) -> str:
        """'bi', 'poly' or 'cross': the agent that saved the model."""
        return self.agent.agent_name

    def rank(self, context: str, candidates: Optional[Sequence[str]] = None, top_k: Optional[int] = None) -> Ranked:
        """``candidates`` (or, if None, the fixed candidates) ordered best first for
        ``context`` (turns joined by newlines), as (candidate, score) pairs; the first
        ``top_k`` only, if given."""
        return self.rank_batch([context], None if candidates is None else [candidates], top_k)[0]

    def rank_batch(
        self,
        contexts: Sequence[str],
        candidates: Optional[Sequence[Sequence[str]]] = None,
        top_k: Optional[int] = None,
        batch_size: int = 32,
    ) -> List[Ranked]:
        """``rank`` for many contexts, each with its own candidates (or all against the fixed
        candidates, if None), ``batch_size`` at a time."""
        if candidates is None and not self.has_fixed:
            raise ValueError("no candidates given and none fixed: pass candidates, or load with fixed_candidates=FILE")
        if candidates is not None and len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidate lists")
        per_context = [None] * len(contexts) if candidates is None else list(candidates)
        ranked: List[Ranked] = []
        for start in range(0, len(contexts), batch_size):
            chunk = list(zip(contexts[start : start + batch_size], per_context[start : start + batch_size]))
            ranked.extend(self._rank_chunk(chunk, top_k, fixed=candidates is None))
        return ranked

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Candidate-side encodings [N, d] of ``texts`` (bi- and poly-encoders): what the
        model caches for candidates, float32, in the order given (unit vectors for a model
        trained with ``--similarity cosine``)."""
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

    def _rank_chunk(self, chunk, top_k, fixed: bool) -> List[Ranked]:
        """One batch_act over ``chunk`` [(context, candidates or None)]."""
        observations = self._observe(chunk, fixed)
        pool = len(self.agent.fixed_candidates) if fixed else max(len(c) for _, c in chunk)
        # how many texts the scoring agent returns, and how many scores it sorts (top-k of a
        # large fixed set is far cheaper than sorting all of it)
        wanted = pool if top_k is None else min(top_k, pool)
        self.agent.opt["cap_num_predictions"] = wanted
        self.agent.rank_top_k = self.agent.opt["rank_top_k"] = wanted if fixed else -1
        replies = self.agent.batch_act(observations)
        out = []
        for reply, (_, cands) in zip(replies, chunk):
            k = min(wanted, pool if fixed else len(cands))
            scores = reply["sorted_scores"].tolist()
            out.append(list(zip(reply["text_candidates"][:k], scores[:k])))
        return out

    def _observe(self, chunk, fixed: bool) -> list:
        """Each context observed by a copy of the agent, as ParlAI's batch world does."""
        while len(self._copies) < len(chunk):
            self._copies.append(self.agent.clone())
        source = "fixed" if fixed else "inline"
        for agent in [self.agent] + self._copies:  # ParlAI reads the option (vectorizing) and the attribute (scoring)
            agent.eval_candidates = agent.opt["eval_candidates"] = source
        observations = []
        for copy, (context, cands) in zip(self._copies, chunk):
            message = {"text": context, "episode_done": True}
            if not fixed:
                if not cands:
                    raise ValueError(f"no candidates to rank for context {context[:60]!r}")
                message["label_candidates"] = list(cands)
            copy.reset()
            observations.append(copy.observe(message))
        return observations
