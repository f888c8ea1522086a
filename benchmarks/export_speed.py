"""Encoding and scoring speed of a model's exports against ours, side by side, in one run.

    python benchmarks/export_speed.py MODEL [--candidates 1000] [--contexts 64] [--precision fp32,bf16]
        [--repeats 3] [--datapath data] [--out runs/export_speed]

MODEL (a bi- or poly-encoder file, or a zoo: path) is exported under --out (``onnx/``,
``st_candidate/`` and, for a bi-encoder, ``st_context/``; the seconds each export took are
reported) and timed against ours on real CCC valid examples drawn with --seed: --candidates of
their responses and --contexts of their contexts (the whole history before the response).
- encode: the N candidate texts to embeddings, tokenizing included, in batches of 256 texts of
  similar length (each way sorts them): ours is ``Ranker.load(MODEL, precision=P).encode``
  (its encoding memo emptied before each run, so every text is encoded), ONNX
  ``OnnxRanker.encode`` (onnxruntime), sentence-transformers ``SentenceTransformer.encode``.
- score: the B contexts against the N candidates' embeddings (encoded beforehand, as a server
  keeps them), from text: ours is the agent's context encoding and scoring of cached
  candidates (``export.context_scores``), ONNX ``OnnxRanker.score``, sentence-transformers
  (bi-encoders only: it has no poly-encoder context) the context side's ``encode`` and a
  numpy dot product with its candidate embeddings.
torch and onnxruntime get the same number of threads. Each cell: one untimed run, then
--repeats timed runs, the ways alternating so that background load hits all alike; the
figure is the median. Every way's largest difference from ours in float32 is reported too
(embeddings, scores); for sentence-transformers over the candidates our agents cut as it does,
and, for a model trained with ParlAI's cut, apart over those cut otherwise (over
--label-truncate - 2 word pieces: see parlai_poly/export.py; --label-truncation end-kept lays
them out as sentence-transformers does). Writes results.json and table.md to --out and prints the table.
"""
import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/scoring_speed.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a file: the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from parlai_poly import Ranker, export  # noqa: E402
from parlai_poly.storage import atomic_write_text  # noqa: E402

ENCODE_BATCH = 256  # the agents' --encode-candidate-vecs-batchsize
ST, ONNX = "sentence-transformers", "onnxruntime"


def ccc_texts(datapath, candidates, contexts, seed):
    """(responses, contexts) of CCC valid examples drawn with ``seed``."""
    from parlai_poly.tasks.ccc.agents import full_context_examples
    from parlai_poly.tasks.ccc.build import read_conversations

    examples = [e for record in read_conversations(datapath, "valid") for e in full_context_examples(record["turns"])]
    chosen = random.Random(seed).sample(examples, max(candidates, contexts))
    return [e["labels"][0] for e in chosen[:candidates]], [e["text"] for e in chosen[:contexts]]


def export_all(model, out, datapath, options):
    """The exports of ``model`` under ``out`` (``options`` override its own), and the seconds each took."""
    seconds, paths = {}, {"onnx": os.path.join(out, "onnx"), "candidate": os.path.join(out, "st_candidate")}
    start = time.perf_counter()
    kind = export.to_onnx(model, paths["onnx"], datapath=datapath, **options)["agent"]
    seconds["onnx"] = time.perf_counter() - start
    sides = ("candidate", "context") if kind == "bi" else ("candidate",)
    for side in sides:
        paths[side] = os.path.join(out, f"st_{side}")
        start = time.perf_counter()
        export.to_sentence_transformers(model, paths[side], side=side, datapath=datapath, **options)
        seconds[f"{ST} {side}"] = time.perf_counter() - start
    return kind, paths, seconds


def ours(ranker):
    """(encode, score) of one of our Rankers."""

    def encode(texts):
        ranker.agent._encoding_memo = None  # else a second run would find every text encoded
        return ranker.encode(texts, batch_size=ENCODE_BATCH)

    return encode, lambda contexts, cands: export.context_scores(ranker, contexts, torch.as_tensor(cands))


def onnx_runtime(path, threads):
    ranker = export.OnnxRanker(path, threads=threads, spinning=False)  # as torch's OMP_WAIT_POLICY above
    return (lambda texts: ranker.encode(texts, batch_size=ENCODE_BATCH)), ranker.score


def sentence_transformers(paths):
    """(encode, score or None): a poly-encoder has no sentence-transformers context side."""
    from sentence_transformers import SentenceTransformer

    models = {side: SentenceTransformer(path, device="cpu") for side, path in paths.items() if side in export.SIDES}

    def encode(texts):
        return models["candidate"].encode(texts, batch_size=ENCODE_BATCH, convert_to_numpy=True)

    def score(contexts, cands):
        return models["context"].encode(contexts, batch_size=ENCODE_BATCH, convert_to_numpy=True) @ np.asarray(cands).T

    return encode, (score if "context" in models else None)


def measure(ways, candidates, contexts, repeats):
    """Median seconds of each way's encode and score, runs alternating; and their outputs."""
    times = {name: {"encode": [], "score": []} for name in ways}
    outputs = {}
    for i in range(repeats + 1):
        for name, (encode, score) in ways.items():
            start = time.perf_counter()
            encoded = np.asarray(encode(candidates), dtype=np.float32)
            middle = time.perf_counter()
            scores = None if score is None else np.asarray(score(contexts, encoded), dtype=np.float32)
            end = time.perf_counter()
            if i:  # the first run of each is a warm-up
                times[name]["encode"].append(middle - start)
                if scores is not None:
                    times[name]["score"].append(end - middle)
            outputs[name] = (encoded, scores)
        print(f"  run {i}/{repeats}", file=sys.stderr, flush=True)
    medians = {
        name: {key: statistics.median(runs) if runs else None for key, runs in t.items()}  # None: no scoring
        for name, t in times.items()
    }
    return medians, outputs


def fidelity(outputs, reference, cut):
    """Each way's largest differences from ``reference``'s outputs; sentence-transformers'
    over the candidates it cuts as we do, and apart over the others (``cut``, a mask [N])."""
    ref_encoded, ref_scores = outputs[reference]
    result = {}
    for name, (encoded, scores) in outputs.items():
        keep = ~cut if name == ST else np.ones_like(cut)
        row = {"embeddings": float(np.abs(encoded - ref_encoded)[keep].max())}
        if scores is not None:
            row["scores"] = float(np.abs(scores - ref_scores)[:, keep].max())
        result[name] = row
    encoded = outputs[ST][0]
    if cut.any():
        norms = np.linalg.norm(encoded, axis=1) * np.linalg.norm(ref_encoded, axis=1)
        cosine = (encoded * ref_encoded).sum(1) / norms
        result[f"{ST} cut"] = {
            "texts": int(cut.sum()),
            "embeddings": float(np.abs(encoded - ref_encoded)[cut].max()),
            "min_cosine": float(cosine[cut].min()),
        }
    return result


def render_table(result):
    ways = list(result["seconds"])
    n, b = result["candidates"], result["contexts"]
    lines = ["| | " + " | ".join(ways) + " |", "|---|" + "---|" * len(ways)]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(w) for w in ways) + " |")

    def rate(key, count):
        return lambda w: "-" if result["seconds"][w][key] is None else f"{count / result['seconds'][w][key]:,.0f}"

    def diff(key):
        return lambda w: f"{result['fidelity'][w][key]:.1e}" if key in result["fidelity"][w] else "-"

    row(f"encode {n:,} candidates, texts/s", rate("encode", n))
    row(f"score {b} contexts x {n:,} candidates, contexts/s", rate("score", b))
    row(f"max abs diff from {result['reference']}, embeddings", diff("embeddings"))
    row(f"max abs diff from {result['reference']}, scores", diff("scores"))
    cut = result["fidelity"].get(f"{ST} cut")
    lines.append("")
    if cut:
        lines.append(
            f"{ST}: {cut['texts']} of the {n:,} candidates are longer than --label-truncate - 2 word pieces, "
            f"which it cuts keeping [SEP] (ours drops [SEP]); left out above, on those: max abs diff "
            f"{cut['embeddings']:.1e}, cosine with ours at least {cut['min_cosine']:.4f}."
        )
    lines.append(
        f"{result['machine']['threads']} threads ({result['machine']['cpu']}); exports took "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["export_seconds"].items())
        + "."
    )
    if result.get("note"):
        lines.append(result["note"])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--precision", default="fp32,bf16", help="ours at each of these (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/export_speed")
    parser.add_argument(
        "--label-truncation",
        choices=("end-kept", "parlai"),
        default=None,
        help="override the model's (agents/base.py): end-kept lays long candidates out as "
        "sentence-transformers does, for a model file saved with ParlAI's cut",
    )
    parser.add_argument("--note", default="", help="a line for the table, e.g. that the machine was shared")
    args = parser.parse_args(argv)
    candidates, contexts = ccc_texts(args.datapath, args.candidates, args.contexts, args.seed)
    options = {"label_truncation": args.label_truncation} if args.label_truncation else {}
    kind, paths, export_seconds = export_all(args.model, args.out, args.datapath, options)
    precisions = args.precision.split(",")
    rankers = {f"ours {p}": Ranker.load(args.model, precision=p, datapath=args.datapath, **options) for p in precisions}
    ways = {name: ours(ranker) for name, ranker in rankers.items()}
    ways[ONNX] = onnx_runtime(paths["onnx"], torch.get_num_threads())
    ways[ST] = sentence_transformers(paths)
    seconds, outputs = measure(ways, candidates, contexts, args.repeats)
    reference = "ours fp32" if "fp32" in precisions else f"ours {precisions[0]}"
    agent = rankers[reference].agent  # which candidates our agents cut otherwise than sentence-transformers
    parlai_cut = export.parlai_cut(rankers[reference], "candidate")
    cut = np.array([parlai_cut and len(agent.dict.txt2vec(t)) > agent.label_truncate - 2 for t in candidates])
    result = {
        "command": shlex.join(["python", "benchmarks/export_speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model,
        "agent": kind,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "candidates": len(candidates),
        "contexts": len(contexts),
        "repeats": args.repeats,
        "reference": reference,
        "export_seconds": export_seconds,
        "seconds": seconds,
        "fidelity": fidelity(outputs, reference, cut),
        "note": args.note,
    }
    os.makedirs(args.out, exist_ok=True)
    table = render_table(result)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "table.md"), table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
