"""Teachers: model files of ours scoring the contexts and candidate texts a student sees.

A teacher is any parlai-poly model file (cross, poly or bi), loaded once with
create_agent_from_model_file (its own agent, sharing nothing with the student), kept in eval
mode, run without gradients. It is given texts, not token ids: teacher and student may use
different backbones and tokenizers, and each tokenizes and truncates as it was trained to.

Candidates come in the two shapes ParlAI's candidate sources give:
- one list shared by the batch (``--candidates batch``: the batch's labels): each context is
  scored against every candidate, and a bi- or poly-encoder teacher encodes each once;
- one list per example (``--candidates inline``): each context against its own list.
Scores come back as [B, N] with a mask [B, N] of real candidates (per-example lists differ in
length). Several teachers (Trans-Encoder's mutual distillation) give the mean of their
standardized scores (each z-scored over the example's candidates, see losses.standardize), so
teachers on different scales, such as two backbones' dot products, count equally.
"""
import os
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from parlai.utils.torch import padded_3d, padded_tensor

from ..candidate_store import dictionary_sha256
from ..storage import sha256_file
from ..errors import ParlaiPolyError
from .losses import standardize
from .score_cache import TeacherScoreCache, pair_keys

Candidates = Union[Sequence[str], Sequence[Sequence[str]]]


def is_shared(candidates: Candidates) -> bool:
    """True for one list of texts shared by the batch, False for one list per example."""
    return len(candidates) == 0 or isinstance(candidates[0], str)


def candidate_rows(candidates: Candidates, batchsize: int) -> List[Sequence[str]]:
    return [candidates] * batchsize if is_shared(candidates) else list(candidates)


class Teacher:
    """One model file, scoring texts."""

    # what the teacher's own options would otherwise turn on: fixed candidates, a cascade,
    # its own teacher (a distilled student used as a teacher), training state
    OVERRIDES = {
        "datatype": "valid",
        "interactive_mode": False,
        "candidates": "inline",
        "eval_candidates": "inline",
        "fixed_candidates_path": None,
        "retrieve_model_file": None,
        "rerank_model_file": None,
        "distill_teacher": None,
    }

    def __init__(self, model_file: str, overrides: Optional[Dict] = None):
        from ..loading import load_agent

        agent = load_agent(model_file, dict(self.OVERRIDES, **(overrides or {})), what="--distill-teacher")
        agent.model.eval()
        self.agent = agent
        self.model_file = agent.opt["model_file"]  # zoo: paths resolved
        self._key = None

    @property
    def key(self) -> Dict:
        """Everything the teacher's scores of a text pair depend on (the cache's key)."""
        if self._key is None:
            opt = self.agent.opt
            self._key = {
                "agent": self.agent.agent_name,
                "model_file_sha256": sha256_file(self.model_file),  # its weights, exactly
                "tokenizer_sha256": dictionary_sha256(self.agent.dict),
                **{k: opt.get(k) for k in ("text_truncate", "label_truncate", "label_truncation", "history_size", "delimiter")},
            }
        return self._key

    @torch.no_grad()
    def score(self, contexts: Sequence[str], candidates: Candidates) -> torch.Tensor:
        """[B, N] float32 scores on the CPU; padding candidates of per-example lists get the
        agent's padding score (masked by the caller)."""
        agent = self.agent
        shared = is_shared(candidates)
        observations = []
        for i, text in enumerate(contexts):
            agent.reset()  # a fresh history: each context is one whole episode
            message = {"text": text, "episode_done": True}
            if not shared:
                message["label_candidates"] = list(candidates[i])
            observations.append(agent.observe(message))
        agent.reset()
        batch = agent.batchify(observations)
        if batch.valid_indices is None or len(batch.valid_indices) != len(contexts):
            raise ParlaiPolyError(f"Teacher {self.model_file}: an empty context cannot be scored.")
        if shared:
            cand_vecs, _ = padded_tensor(agent.vectorize_fixed_candidates(list(candidates)), agent.NULL_IDX)
        else:
            cand_vecs = padded_3d(batch.candidate_vecs, agent.NULL_IDX)
        if agent.use_cuda:
            batch, cand_vecs = batch.to(torch.device("cuda")), cand_vecs.cuda()
        agent.model.eval()
        return agent.score_candidates(batch, cand_vecs).float().cpu()


class TeacherScorer:
    """The teacher(s) a student learns from (several: the mean of their standardized scores),
    through a disk cache when given one.

    ``computed`` and ``reused`` count the pairs scored by a teacher and taken from the cache.
    """

    def __init__(self, model_files: Sequence[str], cache_dir: Optional[str] = None, overrides: Optional[Dict] = None):
        if not model_files:
            raise ParlaiPolyError("--distill-teacher: give at least one model file.")
        self.teachers = [Teacher(path, overrides) for path in model_files]
        self.caches = [None] * len(self.teachers)
        if cache_dir:
            self.caches = [
                TeacherScoreCache(cache_dir, t.key, {"teacher_model_file": os.path.abspath(t.model_file)}) for t in self.teachers
            ]
            # pairs not yet written go to disk when the student lets go of its teacher (ParlAI
            # drops the trained agent without a call that says so) or at exit at the latest
            weakref.finalize(self, _flush_all, self.caches)
        self.computed = 0
        self.reused = 0

    def scores(self, contexts: Sequence[str], candidates: Candidates) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores [B, N], mask [B, N] of real candidates), on the CPU."""
        rows = candidate_rows(candidates, len(contexts))
        width = max((len(r) for r in rows), default=0)
        mask = torch.zeros(len(contexts), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            mask[i, : len(row)] = True
        total = torch.zeros(len(contexts), width)
        for teacher, cache in zip(self.teachers, self.caches):
            scores = self._one_teacher(teacher, cache, contexts, candidates, rows, width)
            total += scores if len(self.teachers) == 1 else standardize(scores, mask)
        return (total / len(self.teachers)).masked_fill(~mask, 0.0), mask

    def _one_teacher(self, teacher, cache, contexts, candidates, rows, width) -> torch.Tensor:
        if cache is None:
            self.computed += sum(len(r) for r in rows)
            return _pad_columns(teacher.score(contexts, candidates), width)
        flat_contexts = [c for c, row in zip(contexts, rows) for _ in row]
        flat_cands = [cand for row in rows for cand in row]
        keys = pair_keys(cache.fingerprint, flat_contexts, flat_cands)
        values, found = cache.lookup(keys)
        out = torch.zeros(len(contexts), width)
        starts = np.cumsum([0] + [len(r) for r in rows])
        missing = [i for i in range(len(rows)) if not found[starts[i] : starts[i + 1]].all()]
        for i in range(len(rows)):
            out[i, : len(rows[i])] = torch.from_numpy(values[starts[i] : starts[i + 1]])
        self.reused += len(keys) - sum(len(rows[i]) for i in missing)
        if missing:
            # the examples with any unseen pair are scored whole (in one teacher batch)
            subset = candidates if is_shared(candidates) else [rows[i] for i in missing]
            computed = teacher.score([contexts[i] for i in missing], subset)
            for j, i in enumerate(missing):
                n = len(rows[i])
                out[i, :n] = computed[j, :n]
                cache.add(keys[starts[i] : starts[i + 1]], computed[j, :n].numpy())
                self.computed += n
        return out

    def flush(self) -> None:
        for cache in self.caches:
            if cache is not None:
                cache.flush()


def _pad_columns(scores: torch.Tensor, width: int) -> torch.Tensor:
    if scores.size(1) >= width:
        return scores[:, :width]
    return torch.cat([scores, scores.new_zeros(scores.size(0), width - scores.size(1))], dim=1)


def _flush_all(caches) -> None:
    for cache in caches:
        cache.flush()
