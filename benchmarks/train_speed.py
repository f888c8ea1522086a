"""Training speed: examples per second of one training step, ours against ParlAI 1.7.2's own.

    python benchmarks/train_speed.py [--models bi,poly-16,poly-64,cross] [--steps 6] [--out docs/train_speed]
        [--response-tokens 32]

One step is what a ranking agent's train_step does: encode a batch of 32 CCC contexts and
their 32 responses, score every context against every response of the batch (batch
negatives; the cross-encoder scores each context against its own response and 3 others of
the batch, 128 pairs), cross-entropy, backward, AdamW (each side's agents' own: ParlAI's
TorchAgent.optim_opts, ours fused). Every implementation gets the same
batches of real CCC train examples, tokenized with MiniLM's tokenizer (contexts the last 64
tokens of the history, responses the first 32: ``--response-tokens 64`` cuts them where the
``ccc_bi`` recipe does, so the random batches pad more), at MiniLM's size (6 layers, d=384,
12 heads, FFN 1536, vocabulary 30,522), embeddings frozen and dropout 0.1 (MiniLM's own) in both.

Columns:
- ``parlai fp32``: parlai.agents.transformer's TransformerMemNetModel (biencoder),
  PolyEncoderModule (polyencoder) and CrossEncoderModule (crossencoder), called as its
  agents call them, on random batches padded to their longest example, as ParlAI's train
  loop makes them. ParlAI has no CPU mixed precision (its --fp16 needs CUDA).
- ``ours fp32`` and ``ours bf16`` (``--precision fp32|bf16``): parlai_poly.modules on
  transformers' BertModel, on the same random batches.
- ``ours bf16 sorted``: the same, on batches as ParlAI's ``--dynamic-batching batchsort``
  makes them: a pool of 1,021 examples sorted by length (rounded up to 8) and cut into
  batches of 32, so each pads little; the timed ones are the middles of equal strata of the
  sorted order, so their examples are as long as the random batches' on average.
- ``ours bf16-full`` and ``ours bf16-full sorted`` (``--precision bf16-full``): the backbone
  trained wholly in bfloat16 (weights cast once per step, layer norms and residual stream
  bfloat16), not under autocast, on the random and the sorted batches.
- ``ours bf16 grouped`` (``--length-groups 2``): the random batches, each encoded in two
  groups of similar length padded to their own longest (same outputs as one padded batch).
Each cell: one untimed step, then --steps timed steps, the implementations alternating step
by step so background load hits all alike; the figure is the median. Also reported: the
tokens each layout feeds the encoder per example (real and padding), and the ratios the
project targets (bf16 / fp32 >= 1.6, bf16 / ParlAI >= 2, bf16 sorted / ParlAI >= 2.5; the
sorted ones by examples and by real tokens per second, as its batches hold other examples),
and what length groups buy on the random batches (grouped / bf16, the same examples), and
bf16-full against autocast and ParlAI.
Writes results.json, table.md and train_speed.png to --out; ``--render RESULTS`` writes the
table and plot again from a results.json without measuring.
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/scoring_speed.py

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a file: the repository root

import torch  # noqa: E402

BATCH = 32
CONTEXT_TOKENS, RESPONSE_TOKENS = 64, 32
CROSS_CANDIDATES = 4  # the label and 3 other responses of the batch, per context
POOL = 1021  # ParlAI's DynamicBatchWorld buffer
MINILM = dict(vocab=30522, dim=384, layers=6, heads=12, ffn=1536, max_positions=512)
MINILM_DROPOUT = 0.1  # its config's hidden_dropout_prob and attention_probs_dropout_prob
SETTINGS = (
    "parlai fp32", "ours fp32", "ours bf16", "ours bf16-full", "ours bf16 sorted", "ours bf16-full sorted",
    "ours bf16 grouped",
)
LENGTH_GROUPS = 2  # the grouped setting's --length-groups


# ---- data: real CCC examples, tokenized as the agents do ----------------------------------
def ccc_examples(datapath, count, seed, response_tokens=RESPONSE_TOKENS):
    """(context ids, response ids) of ``count`` CCC train examples drawn with ``seed``."""
    from parlai_poly.backbone import load_tokenizer
    from parlai_poly.tasks.ccc.agents import full_context_examples
    from parlai_poly.tasks.ccc.build import read_conversations

    tokenizer = load_tokenizer(None)
    pairs = [
        (e["text"], e["labels"][0])
        for record in read_conversations(datapath, "train")
        for e in full_context_examples(record["turns"])
    ]
    chosen = random.Random(seed).sample(pairs, count)

    def ids(text, limit, keep_last):
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = body[-(limit - 2):] if keep_last else body[: limit - 2]
        return [tokenizer.cls_token_id] + body + [tokenizer.sep_token_id]

    return [(ids(c, CONTEXT_TOKENS, True), ids(r, response_tokens, False)) for c, r in chosen]


def pad(rows):
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def random_batches(examples, steps):
    return [examples[i * BATCH : (i + 1) * BATCH] for i in range(steps)]


def sorted_batches(examples, steps, seed):
    """As ParlAI's batchsort: the pool sorted by (context, response) length rounded up to 8 and
    cut into batches. Timed: ``steps - 1`` of them, the middles of as many equal strata of the
    sorted order, so they hold examples as long as the pool's (a random few may all be short
    ones), in a random order, after one more (the warm-up)."""
    ceil8 = lambda n: (n + 7) // 8 * 8  # noqa: E731
    rng = random.Random(seed)
    pool = sorted(examples[:POOL], key=lambda e: (ceil8(len(e[0])), ceil8(len(e[1])), rng.random()))
    batches = [pool[i : i + BATCH] for i in range(0, len(pool) - BATCH + 1, BATCH)]
    timed = [batches[int((k + 0.5) * len(batches) / (steps - 1))] for k in range(steps - 1)]  # strata's middles
    rng.shuffle(timed)
    return [batches[1]] + timed


def tokens_per_example(batches):
    real = sum(len(c) + len(r) for b in batches for c, r in b)
    fed = sum(pad([c for c, _ in b]).numel() + pad([r for _, r in b]).numel() for b in batches)
    n = sum(len(b) for b in batches)
    return {"real": real / n, "fed": fed / n}


# ---- implementations: step(batch) trains once --------------------------------------------
def cross_pairs(batch):
    """(context index, candidate index, label position) of each context's 4 candidates."""
    n = len(batch)
    context_index = torch.arange(n).repeat_interleave(CROSS_CANDIDATES)
    cand_index = torch.stack([(torch.arange(n) + k) % n for k in range(CROSS_CANDIDATES)], 1).reshape(-1)
    return context_index, cand_index  # the label is candidate 0 of each context


def ours(model, precision, length_groups=1):
    from parlai_poly.backbone import load_encoder
    from benchmarks.scoring_impls import our_config
    from parlai_poly.modules import CrossEncoderModule, TextEncoder, build_module

    encoder = TextEncoder(load_encoder(None), pad_idx=0, freeze_embeddings=True)
    encoder.compute_dtype = torch.bfloat16 if precision.startswith("bf16") else None
    encoder.whole_backbone_in_compute_dtype = precision == "bf16-full"
    encoder.length_groups = length_groups
    module = build_module(our_config(model), encoder)

    def scores(batch):
        contexts, responses = pad([c for c, _ in batch]), pad([r for _, r in batch])
        if model != "cross":
            return module(contexts, responses)  # [B, B]
        context_index, cand_index = cross_pairs(batch)
        ids, segments = CrossEncoderModule.pair_inputs(contexts, responses, context_index, cand_index, 0)
        return module(ids, segments).view(len(batch), CROSS_CANDIDATES)

    return module, scores


def parlai(model):
    import warnings

    from benchmarks import scoring_impls as benchmark

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from parlai.agents.transformer.crossencoder import CrossEncoderModule
        from parlai.agents.transformer.modules import TransformerMemNetModel
        from parlai.agents.transformer.polyencoder import PolyEncoderModule

    opt = benchmark.parlai_opt(MINILM, model)
    opt["reduction_type"] = "first" if model == "cross" else "mean"
    # MiniLM trains with dropout 0.1 on hidden states and attention: the same work for both
    opt["dropout"] = opt["attention_dropout"] = MINILM_DROPOUT
    dictionary = benchmark._FakeParlaiDict(MINILM["vocab"])
    if model == "bi":
        module = TransformerMemNetModel(opt, dictionary)
    elif model.startswith("poly-"):
        module = PolyEncoderModule(opt, dictionary, 0)
    else:
        module = CrossEncoderModule(opt, dictionary, 0)
    for name, param in module.named_parameters():
        if "embeddings" in name:  # frozen, as ours: the same trainable weights
            param.requires_grad_(False)

    def scores(batch):
        contexts, responses = pad([c for c, _ in batch]), pad([r for _, r in batch])
        if model == "bi":  # TransformerRankerAgent: context and candidates, one forward each
            context, cands = module(xs=contexts, mems=None, cands=responses.unsqueeze(1))
            return context @ cands.squeeze(1).t()
        if model.startswith("poly-"):  # PolyencoderAgent.score_candidates
            ctxt_rep, ctxt_mask, _ = module(ctxt_tokens=contexts)
            _, _, cand_rep = module(cand_tokens=responses.unsqueeze(1))
            cand_rep = cand_rep.squeeze(1).unsqueeze(0).expand(len(batch), -1, -1)
            return module(ctxt_rep=ctxt_rep, ctxt_rep_mask=ctxt_mask, cand_rep=cand_rep)
        context_index, cand_index = cross_pairs(batch)  # CrossencoderAgent: context ++ candidate
        pairs = [batch[i][0] + batch[j][1][1:] for i, j in zip(context_index.tolist(), cand_index.tolist())]
        segments = [[0] * len(batch[i][0]) + [1] * (len(batch[j][1]) - 1) for i, j in zip(context_index.tolist(), cand_index.tolist())]
        return module(pad(pairs), pad(segments)).view(len(batch), CROSS_CANDIDATES)

    return module, scores


def adamw(side):
    """The AdamW that ``side``'s agents train with, as their optim_opts builds it."""
    if side == "ours":
        from parlai_poly.agents.base import HuggingFaceRankerAgent as agent
    else:
        from parlai.core.torch_agent import TorchAgent as agent
    return agent.optim_opts()["adamw"]


def trainer(module, scores, side):
    module.train()
    optimizer = adamw(side)([p for p in module.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.01)

    def step(batch):
        optimizer.zero_grad()
        logits = scores(batch).float()
        labels = torch.arange(len(batch)) if logits.size(1) == len(batch) else torch.zeros(len(batch), dtype=torch.long)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()

    return step


# ---- measuring ------------------------------------------------------------------------------
def measure(model, batches, steps):
    """Median seconds per step of each setting, steps alternating between settings."""
    impls = {
        "parlai fp32": (trainer(*parlai(model), "parlai"), batches["random"]),
        "ours fp32": (trainer(*ours(model, "fp32"), "ours"), batches["random"]),
        "ours bf16": (trainer(*ours(model, "bf16"), "ours"), batches["random"]),
        "ours bf16-full": (trainer(*ours(model, "bf16-full"), "ours"), batches["random"]),
        "ours bf16 sorted": (trainer(*ours(model, "bf16"), "ours"), batches["sorted"]),
        "ours bf16-full sorted": (trainer(*ours(model, "bf16-full"), "ours"), batches["sorted"]),
        "ours bf16 grouped": (trainer(*ours(model, "bf16", LENGTH_GROUPS), "ours"), batches["random"]),
    }
    times = {name: [] for name in impls}
    for i in range(steps + 1):
        for name, (step, data) in impls.items():
            start = time.perf_counter()
            step(data[i % len(data)])
            if i:  # the first step of each is a warm-up
                times[name].append(time.perf_counter() - start)
        print(f"  {model} step {i}/{steps}", file=sys.stderr, flush=True)
    return {name: BATCH / statistics.median(t) for name, t in times.items()}


def ratios(row, tokens):
    """Speed ratios. The sorted layout's timed batches hold examples as long as the pool's, so
    its examples per second compare with the random batches'; also by real tokens per second,
    which holds even where their examples' lengths differ (it assumes time grows with tokens)."""
    sorted_tokens = row["ours bf16 sorted"] * tokens["sorted"]["real"]
    return {
        "bf16 / fp32 (ours)": row["ours bf16"] / row["ours fp32"],
        "bf16 / parlai": row["ours bf16"] / row["parlai fp32"],
        "bf16 sorted / bf16, real tokens/s": sorted_tokens / (row["ours bf16"] * tokens["random"]["real"]),
        "bf16 sorted / parlai, real tokens/s": sorted_tokens / (row["parlai fp32"] * tokens["random"]["real"]),
        "bf16 sorted / parlai, examples/s": row["ours bf16 sorted"] / row["parlai fp32"],
        "bf16 grouped / bf16": row["ours bf16 grouped"] / row["ours bf16"],
        "bf16-full / bf16": row["ours bf16-full"] / row["ours bf16"],
        "bf16-full / parlai": row["ours bf16-full"] / row["parlai fp32"],
        "bf16-full sorted / parlai, examples/s": row["ours bf16-full sorted"] / row["parlai fp32"],
    }


RATIO_HEADS = (  # the table's names for ratios()'s values, in their order
    "bf16 / fp32", "bf16 / ParlAI", "sorted / random (tokens/s)", "sorted / ParlAI (tokens/s)",
    "sorted / ParlAI (ex/s)", "grouped / random", "bf16-full / bf16", "bf16-full / ParlAI",
    "bf16-full sorted / ParlAI (ex/s)",
)


def render_table(result):
    head = "| model | " + " | ".join([f"{s} ex/s" for s in SETTINGS] + list(RATIO_HEADS)) + " |"
    lines = [head, "|" + "---|" * (len(SETTINGS) + len(RATIO_HEADS) + 1)]
    for model, row in result["rows"].items():
        r = ratios(row, result["tokens_per_example"])
        cells = [f"{row[s]:.1f}" for s in SETTINGS] + [f"{v:.2f}x" for v in r.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    t = result["tokens_per_example"]
    lines.append("")
    lines.append(
        f"Contexts cut to {CONTEXT_TOKENS} tokens, responses to {result.get('response_tokens', RESPONSE_TOKENS)}. "
        f"Tokens fed to the encoder per example (contexts + responses, padding included): random "
        f"batches {t['random']['fed']:.1f} ({t['random']['real']:.1f} real), sorted batches "
        f"{t['sorted']['fed']:.1f} ({t['sorted']['real']:.1f} real)."
    )
    return "\n".join(lines)


def render_plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["rows"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(SETTINGS)
    for k, setting in enumerate(SETTINGS):
        values = [result["rows"][m][setting] for m in models]
        offset = (k - (len(SETTINGS) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(models))], values, width, label=setting)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("training examples / s (higher is better)")
    lengths = f"contexts {CONTEXT_TOKENS} tokens, responses {result.get('response_tokens', RESPONSE_TOKENS)}"
    ax.set_title(f"One training step, batch {BATCH} ({lengths}), MiniLM size, {result['machine']['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bi,poly-16,poly-64,cross")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--datapath", default="data")
    parser.add_argument("--out", default="docs/train_speed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--response-tokens", type=int, default=RESPONSE_TOKENS, help="responses cut to this many tokens")
    parser.add_argument("--render", default=None, help="a results.json to render again, measuring nothing")
    args = parser.parse_args(argv)
    if args.render:
        result = json.load(open(args.render))
        result["ratios"] = {m: ratios(row, result["tokens_per_example"]) for m, row in result["rows"].items()}
        return write(result, args.out)
    torch.manual_seed(args.seed)
    examples = ccc_examples(args.datapath, POOL + BATCH * (args.steps + 1), args.seed, args.response_tokens)
    batches = {"random": random_batches(examples[POOL:], args.steps + 1), "sorted": sorted_batches(examples, args.steps + 1, args.seed)}
    result = {
        "command": " ".join(["python benchmarks/train_speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "response_tokens": args.response_tokens,
        "tokens_per_example": {k: tokens_per_example(v[1:]) for k, v in batches.items()},  # the timed ones
        "rows": {},
    }
    for model in args.models.split(","):
        result["rows"][model] = measure(model, batches, args.steps)
        result.setdefault("ratios", {})[model] = ratios(result["rows"][model], result["tokens_per_example"])
    return write(result, args.out)


def write(result, out):
    from parlai_poly.storage import atomic_write_text

    os.makedirs(out, exist_ok=True)
    table = render_table(result)
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(out, "table.md"), table + "\n")
    render_plot(result, os.path.join(out, "train_speed.png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
