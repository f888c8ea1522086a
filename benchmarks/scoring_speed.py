"""Scoring time per context, ours against ParlAI 1.7.2's own modules (the paper's Table 5).

    python -m benchmarks.scoring_speed [--include-1m] [--sizes 1000,100000] [--repeats 7] ...

"Per context" is the paper's cached setting: encode one context (32 tokens) and score it
against N candidate vectors that are already cached. The cached vectors are random tensors
of the right shape and dtype for each implementation, so candidate encoding is excluded.
The cross-encoder has nothing to cache: every candidate is a forward pass of the
(context, candidate) pair, so it is measured on a few pairs (--cross-pairs) and
extrapolated linearly to N (marked as such).

More rows, ours only or ours in another setting:
- bf16 (poly rows): our poly-encoder as --score-dtype bfloat16 runs it: the products against
  a bfloat16 copy of the cached candidates, then the top 100 scored again in float32.
- cross-mixed: --cross-mixed-pairs (1,000) pairs whose candidates have chit-chat lengths
  (MIXED_LENGTHS: a log-normal fitted to CCC's test responses, 3 to 64 tokens). ParlAI's
  cross-encoder pads every pair to the longest; ours sorts pairs by length and pads each
  pass of 256 to its own longest (through CrossEncoderAgent.score_pairs itself).
- cascade-exact, cascade-hnsw (at every N, 1M included): the poly agent's retrieve and
  rerank, bi top-100 (every candidate scored, or a faiss HNSW index) -> poly-64 orders
  them -> cross reorders the best 10. Their candidates are clustered unit vectors (an ANN
  index's recall depends on the vectors; isotropic random ones are its worst case, and
  unlike any real encodings). The HNSW index is built once per N, timed, and its recall@100
  against exact retrieval is measured over 50 queries near candidates, at efSearch 64 to 512
  (the row's timing uses 128). Timed only (the memory process would build the index again).

Both implementations are built at the same size (MiniLM: 6 layers, d=384, 12 heads, FFN 1536,
vocabulary 30,522), randomly initialised (timing does not depend on the weights), in eval
mode under torch.no_grad, with the same number of torch threads. Ours: parlai_poly.modules on
a transformers BertModel, called through the modules' public methods as our agents call
them. ParlAI's: parlai.agents.transformer's TransformerMemNetModel (bi), PolyEncoderModule
(poly) and CrossEncoderModule (cross), called as its agents call them.

Timing runs in one fresh worker process with the default allocator: a few throwaway passes
warm the process up, then every cell gets --warmup untimed rounds and --repeats timed
rounds, the two implementations alternating run by run so background load hits both alike;
the figure is the median. Slow cells get fewer rounds (at least 3) to fit --cell-budget-s,
and say so. The worker runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise: with the
default spinning policy, 2 OpenMP threads on 2 cores shared with any other job wait for each
other at every parallel region, and one MiniLM forward went from 30 ms to 500 ms here.

Peak extra memory of the scoring step (cached candidates already resident, context already
encoded; for cross: the whole forward of the measured pairs) is read in a second fresh
worker process from /proc/self/status: the peak resident set (VmHWM) is reset by writing 5
to /proc/self/clear_refs, VmRSS is read, the step runs once, and the figure is VmHWM minus
that VmRSS. That process runs glibc's malloc with a fixed mmap threshold (64 KiB), so every
tensor's memory is its own mapping, returned to the system when freed, and never hidden by
memory a previous step left in the heap (timing runs without it: it adds page faults).
A known 256 MiB allocation is measured the same way as a check (``memory_calibration_mib``).

Writes ``results.json``, ``table.txt`` and ``benchmark.png`` (ms per context against N,
log-log; ours solid, ours bf16 dotted, ParlAI dashed) to --out, each atomically.
"""
import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # its workers run from there

MODELS = ("bi", "poly-16", "poly-64", "poly-360", "cross", "cross-mixed", "cascade-exact", "cascade-hnsw")
# ours_bf16: our poly-encoder with --score-dtype bfloat16 (poly rows only); the cascades are ours only
IMPLS = ("ours", "ours_bf16", "parlai")
IMPL_NAMES = {"ours": "ours", "ours_bf16": "ours bf16", "parlai": "ParlAI 1.7.2"}
MILLION = 1_000_000

# Candidate lengths of the cross-mixed row: a log-normal fitted to the MiniLM token counts
# ([CLS] and [SEP] included) of CCC's 13,034 test responses (median 18, 90th percentile 44,
# mean 24; 3.4% over 64, truncated there as --label-truncate 64 does): many short, few long.
MIXED_LENGTHS = dict(log_mean=2.885, log_std=0.723, low=3, high=64)

# The cascade rows, as the poly agent's retrieve-and-rerank options run it: bi top-100
# (exact, or an HNSW index) -> poly-64 orders them -> cross reorders the best 10.
CASCADE = dict(retrieve_top_k=100, poly="poly-64", rerank_top_k=10, hnsw_m=32, hnsw_ef_search=128,
               hnsw_ef_construction=40, recall_queries=50, topics=1024, cross_pool=1000)
BF16_RESCORE_TOP_K = 100  # the poly agent's --bf16-rescore-top-k default

# all-MiniLM-L6-v2's size (its config.json), and a tiny one for --quick
MINILM = dict(layers=6, dim=384, heads=12, ffn=1536, vocab=30522, max_positions=512)
TINY = dict(layers=2, dim=32, heads=4, ffn=64, vocab=1000, max_positions=128)

# as CrossEncoderAgent scores pairs: --cross-pairs-per-pass defaults to 256
OUR_CROSS_PAIRS_PER_PASS = 256

# The paper's Table 5, CPU column (BERT-base size, a many-core CPU), ms per context
PAPER_CPU_MS = {
    "bi": {1000: 115, 100000: 160},
    "poly-16": {1000: 122, 100000: 678},
    "poly-64": {1000: 126, 100000: 692},
    "poly-360": {1000: 160, 100000: 837},
    "cross": {1000: 21700, 100000: 2200000},
}

MEMORY_METHOD = (
    "Peak extra resident memory of the scoring step, read from /proc/self/status: VmHWM is "
    "reset (write 5 to /proc/self/clear_refs), VmRSS read, the step run once, extra = VmHWM "
    "- VmRSS. The cached candidates and the encoded context are resident before and not "
    "counted; for cross the step is the whole forward of the measured pairs. Measured in its "
    "own fresh process (not the timing one), whose glibc malloc runs with a fixed 64 KiB mmap "
    "threshold so freed tensors go back to the system and every allocation shows in the "
    "resident set. Torch allocations are seen (unlike tracemalloc). Check: a 256 MiB tensor "
    "is measured the same way (memory_calibration_mib)."
)


def _progress(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# memory


def _fixed_mmap_threshold(threshold=64 * 1024):
    """Make glibc mmap every allocation over ``threshold`` (and so unmap it when freed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold) and libc.mallopt(m_trim_threshold, 128 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _proc_status_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


class PeakMemory:
    """Peak extra resident memory of one call, in MiB (None where /proc cannot tell)."""

    def __init__(self):
        self.available = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = "VmHWM" in _proc_status_kib()
        except OSError:
            pass

    def __call__(self, fn):
        if not self.available:
            fn()
            return None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _proc_status_kib()["VmRSS"]
        result = fn()
        peak = _proc_status_kib()["VmHWM"]
        del result
        return max(0, peak - before) / 1024.0

    def calibrate(self, mib=256):
        import torch

        return self(lambda: torch.ones(mib * 1024 * 1024 // 4))


# ---------------------------------------------------------------------------------------
# the two implementations, as their agents call them


class _FakeParlaiDict:
    """What ParlAI's modules read from a DictionaryAgent: len(), tok2ind, the null token."""

    null_token = "__null__"

    def __init__(self, size):
        self.size = size
        self.tok2ind = {self.null_token: 0}

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        return self.tok2ind[key]


def parlai_opt(cfg, model):
    """The options ParlAI's modules read, at the size of ``cfg``.

    variant xlm (post-layer-norm with a layer norm on the embeddings), gelu, learned
    positions and two segment embeddings: BERT's architecture, which is also how ParlAI's
    pretrained bi/poly/cross-encoders are configured.
    """
    opt = dict(
        n_layers=cfg["layers"],
        n_encoder_layers=-1,
        embedding_size=cfg["dim"],
        n_heads=cfg["heads"],
        ffn_size=cfg["ffn"],
        dropout=0.0,
        attention_dropout=0.0,
        relu_dropout=0.0,
        activation="gelu",
        variant="xlm",
        n_positions=cfg["max_positions"],
        learn_positional_embeddings=True,
        embeddings_scale=False,
        n_segments=2,
        output_scaling=1.0,
        checkpoint_activations=False,
        reduction_type="mean",
        # TransformerMemNetModel (the bi-encoder)
        share_word_embeddings=True,
        learn_embeddings=True,
        share_encoders=False,
        wrap_memory_encoder=False,
        memory_attention="sqrt",
        normalize_sent_emb=False,
        # PolyEncoderModule
        polyencoder_type="codes",
        poly_n_codes=64,
        poly_attention_type="basic",
        poly_attention_num_heads=4,
        codes_attention_type="basic",
        codes_attention_num_heads=4,
    )
    if model == "cross":
        opt["reduction_type"] = "first"
    if model.startswith("poly-"):
        opt["poly_n_codes"] = int(model.split("-")[1])
        opt["reduction_type"] = "first"  # candidate side only; cached here
    return opt


class Impl:
    """encode(ids) -> context; score(context, cached) -> [1, N]; cached(cands [N, d]).

    For cross: pairs(ctx_ids [1, T], cand_ids [P, L]) -> [1, P].
    """

    encode = score = pairs = None

    @staticmethod
    def cached(cands):
        return cands


def our_config(model: str):
    """The agents' default architecture for a benchmark model name (bi, poly-M, cross)."""
    from parlai_poly.modules import BiEncoderConfig, CrossEncoderConfig, PolyEncoderConfig

    if model == "bi":
        return BiEncoderConfig()
    if model.startswith("poly-"):
        return PolyEncoderConfig(poly_n_codes=int(model.split("-")[1]))
    return CrossEncoderConfig()


def build_ours(cfg, model):
    from transformers import BertConfig, BertModel

    from parlai_poly.modules import TextEncoder, build_module

    config = BertConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["dim"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        intermediate_size=cfg["ffn"],
        max_position_embeddings=cfg["max_positions"],
        type_vocab_size=2,
        hidden_act="gelu",
    )
    # as parlai_poly.backbone.load_encoder: a bare encoder, no pooler
    backbone = BertModel(config, add_pooling_layer=False)
    encoder = TextEncoder(backbone, pad_idx=0)
    impl = Impl()
    module = build_module(our_config(model), encoder)
    if model == "bi":
        impl.encode = module.encode_context
        impl.score = module.score
    elif model.startswith("poly-"):
        impl.encode = module.encode_context
        impl.score = lambda context, cands: module.score(context[0], context[1], cands)
    else:
        impl.pairs = _our_cross_pairs(module)
    module.eval()
    impl.module = module
    return impl


def _our_cross_pairs(module):
    """pairs(ctx_ids [1, T], cand_ids [P, L]) -> [1, P] through the cross agent's own
    score_pairs: pairs sorted by length, passes of 256 each padded to its own longest pair."""
    import torch

    from parlai_poly.modules.cross_encoder import score_pairs

    def pairs(ctx_ids, cand_ids):
        n = cand_ids.size(0)
        context_index, cand_index = torch.zeros(n, dtype=torch.long), torch.arange(n)
        return score_pairs(module, ctx_ids, cand_ids, context_index, cand_index, 0, False, OUR_CROSS_PAIRS_PER_PASS).view(1, n)

    return pairs


def build_ours_bf16(cfg, model):
    """Our poly-encoder as --score-dtype bfloat16 runs it: products against a bfloat16 copy
    of the cached candidates, then the top --bf16-rescore-top-k scored again in float32."""
    if not model.startswith("poly-"):
        return None
    from parlai_poly.modules.poly_encoder import rescore_top

    impl = build_ours(cfg, model)
    module = impl.module

    def score(context, cached):
        fast, exact = cached  # [N, d] bfloat16, [N, d] float32
        rescore = lambda top: module.score(context[0], context[1], top)  # noqa: E731
        return rescore_top(module.score(context[0], context[1], fast), rescore, exact, BF16_RESCORE_TOP_K)

    impl.score = score
    impl.cached = lambda cands: (cands.bfloat16(), cands)  # both kept, as the agent keeps them
    return impl


def build_parlai(cfg, model):
    import types
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation from parlai.core.opt
        from parlai.agents.transformer.crossencoder import CrossEncoderModule, CrossencoderAgent
        from parlai.agents.transformer.modules import TransformerMemNetModel
        from parlai.agents.transformer.polyencoder import PolyEncoderModule
        from parlai.agents.transformer.transformer import TransformerRankerAgent

    opt = parlai_opt(cfg, model)
    dictionary = _FakeParlaiDict(cfg["vocab"])
    impl = Impl()
    if model == "bi":
        module = TransformerMemNetModel(opt, dictionary)
        # TransformerRankerAgent.score_candidates with cached (fixed) candidate encodings
        impl.encode = lambda ids: module(xs=ids, mems=None, cands=None)[0]
        impl.score = lambda context, cands: TransformerRankerAgent._score(None, context, cands)
    elif model.startswith("poly-"):
        module = PolyEncoderModule(opt, dictionary, 0)
        # PolyencoderAgent.get_ctxt_rep / get_scores; its cached encodings are [1, N, d]
        impl.encode = lambda ids: module(ctxt_tokens=ids)[:2]
        impl.score = lambda context, cands: module(ctxt_rep=context[0], ctxt_rep_mask=context[1], cand_rep=cands)
        impl.cached = lambda cands: cands.unsqueeze(0)  # PolyencoderAgent._make_candidate_encs
    else:
        module = CrossEncoderModule(opt, dictionary, 0)
        agent = types.SimpleNamespace(model=module, use_cuda=False, NULL_IDX=0)

        def pairs(ctx_ids, cand_ids):  # ParlAI's own CrossencoderAgent.score_candidates
            batch = types.SimpleNamespace(text_vec=ctx_ids)
            return CrossencoderAgent.score_candidates(agent, batch, cand_ids.unsqueeze(0))

        impl.pairs = pairs
    module.eval()
    impl.module = module
    return impl


def build_parlai_ranker(cfg, model):
    """ParlAI's modules; none for the cascades (ParlAI has no retrieve-and-rerank)."""
    if model.startswith("cascade"):
        return None
    return build_parlai(cfg, "cross" if model == "cross-mixed" else model)


def build_ours_ranker(cfg, model):
    if model.startswith("cascade"):
        return build_cascade(cfg, model)
    return build_ours(cfg, "cross" if model == "cross-mixed" else model)


BUILDERS = {"ours": build_ours_ranker, "ours_bf16": build_ours_bf16, "parlai": build_parlai_ranker}


# ---------------------------------------------------------------------------------------
# the cascade, as parlai_poly.agents.cascade.RetrieveAndRerank runs it


def clustered_candidates(n, dim, topics, seed, step=100000):
    """[n, dim] unit vectors around ``topics`` random directions (noise as large as the
    topic): sentence encodings cluster by topic, and an ANN index's recall on isotropic
    random vectors (no structure at all) says little about real encodings."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(topics, dim, generator=gen)
    out = torch.empty(n, dim)
    for start in range(0, n, step):  # in steps: no [n, dim] temporaries beside the output
        rows = min(step, n - start)
        x = centers[torch.randint(0, topics, (rows,), generator=gen)] + torch.randn(rows, dim, generator=gen)
        out[start : start + rows] = x / x.norm(dim=1, keepdim=True)
    return out


def mixed_token_ids(torch, gen, rows, vocab):
    """[rows, 64] candidates of chit-chat-like lengths (MIXED_LENGTHS), right-padded with 0."""
    m = MIXED_LENGTHS
    lengths = torch.empty(rows).normal_(m["log_mean"], m["log_std"], generator=gen).exp().round()
    lengths = lengths.clamp(m["low"], m["high"]).long()
    ids = torch.randint(5, vocab, (rows, m["high"]), generator=gen)
    ids[:, 0] = 1
    ids[torch.arange(rows), lengths - 1] = 2  # [SEP] ends each candidate
    ids[torch.arange(m["high"]).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids


def build_cascade(cfg, model):
    """encode(ids) -> ids; cached(encs) -> what retrieval needs (hnsw: the index, built and
    timed here, with its recall@K against exact); score(ids, cached) -> [1, N]: bi top-K,
    poly-64 orders them, cross reorders the best 10, the rest tie below (as with hnsw)."""
    import types

    import torch

    from parlai_poly import ranking

    bi, poly, cross = build_ours(cfg, "bi"), build_ours(cfg, CASCADE["poly"]), build_ours(cfg, "cross")
    gen = torch.Generator().manual_seed(7)
    # the cross-encoder reads the picked candidates' tokens: a pool of chit-chat-like ones
    pool = mixed_token_ids(torch, gen, CASCADE["cross_pool"], cfg["vocab"])
    impl = Impl()
    impl.module = poly.module
    impl.encode = lambda ids: ids
    k, rerank = CASCADE["retrieve_top_k"], CASCADE["rerank_top_k"]

    def retrieve(context, cached):  # [1, d] -> [1, K]
        if cached.index is None:
            return bi.module.score(context, cached.encs).topk(min(k, len(cached.encs)), dim=1).indices
        from parlai_poly.retrieval_index import search

        return search(cached.index, context, min(k, len(cached.encs)), CASCADE["hnsw_ef_search"])

    def score(ids, cached):  # the poly agent's cascade (RetrieveAndRerank.scores), one context
        top = retrieve(bi.encode(ids), cached)
        context = poly.encode(ids)
        top = ranking.rerank_head(top, lambda picked: poly.module.score(context[0], context[1], cached.encs[picked]))
        top = ranking.rerank_head(top, lambda head: cross.pairs(ids, pool[head[0] % len(pool)]), rerank)
        return ranking.cascade_scores(top, torch.zeros(1, len(cached.encs)))

    def cached(encs):
        out = types.SimpleNamespace(encs=encs, index=None, info={})
        if model == "cascade-hnsw":
            out.index, out.info = _hnsw_with_recall(encs, bi)
        return out

    impl.score, impl.cached = score, cached
    return impl


def _hnsw_with_recall(encs, bi):
    """The HNSW index over encs, its build time and recall@K against exact retrieval, over
    queries near candidates (a context near its response: a candidate plus noise)."""
    import torch

    from parlai_poly.retrieval_index import build_hnsw, search

    began = time.perf_counter()
    index = build_hnsw(encs, CASCADE["hnsw_m"], CASCADE["hnsw_ef_construction"], desc=f"HNSW index of {len(encs):,}")
    seconds = time.perf_counter() - began
    gen = torch.Generator().manual_seed(11)
    picks = torch.randint(0, len(encs), (CASCADE["recall_queries"],), generator=gen)
    queries = encs[picks] + 0.5 * torch.randn(len(picks), encs.size(1), generator=gen) / math.sqrt(encs.size(1))
    k = min(CASCADE["retrieve_top_k"], len(encs))
    exact = bi.module.score(queries, encs).topk(k, dim=1).indices
    by_ef = {}
    for ef in sorted({64, 128, 256, 512, CASCADE["hnsw_ef_search"]}):  # the recall / time trade-off
        began = time.perf_counter()
        found = search(index, queries, k, ef)
        ms = 1000 * (time.perf_counter() - began) / len(picks)
        hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist()))
        by_ef[str(max(ef, k))] = {"recall": round(hits / (k * len(picks)), 4), "search_ms": round(ms, 3)}
    info = {"hnsw_build_s": round(seconds, 2), "k": k, "recall_queries": len(picks),
            "recall_at_k": by_ef[str(max(CASCADE["hnsw_ef_search"], k))]["recall"], "by_ef_search": by_ef,
            **{name: CASCADE[name] for name in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction")}}
    return index, info


# ---------------------------------------------------------------------------------------
# measuring (in the worker process)


def _token_ids(torch, gen, rows, length, vocab):
    ids = torch.randint(5, vocab, (rows, length), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 2  # stand-ins for [CLS] / [SEP]; 0 is padding
    return ids


def _n_runs(seconds_per_run, repeats, budget):
    """Fewer runs for slow cells: fit ``budget`` seconds, but at least 3 (or ``repeats``)."""
    if seconds_per_run * repeats <= budget:
        return repeats
    return max(min(3, repeats), int(budget // max(seconds_per_run, 1e-9)))


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "parlai"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def measure(settings, mode):
    """Every cell of the benchmark, in a fresh process (see ``_worker_main``).

    mode "time": warm-up, then the timed runs, the implementations alternating run by run.
    mode "memory": each cell's scoring step once per implementation, under PeakMemory.
    Timing and memory run in separate processes because the memory reading needs glibc's
    mmap threshold fixed low, which adds page faults the default allocator would not have.
    The cascades are timed only (their HNSW index would be built twice otherwise).
    """
    import torch

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    cfg = settings["config"]
    out = {"torch_threads": torch.get_num_threads(), "versions": _versions(), "cells": []}
    if mode == "memory":
        out["peak_memory"] = PeakMemory()
        out["memory_available"] = out["peak_memory"].available
        out["memory_calibration_mib"] = {"allocated": 256, "measured": out["peak_memory"].calibrate(256)}
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "context": _token_ids(torch, gen, 1, settings["context_tokens"], cfg["vocab"]),
        "cross": _token_ids(torch, gen, settings["cross_pairs"], settings["cand_tokens"], cfg["vocab"]),
        "cross-mixed": mixed_token_ids(torch, gen, settings["cross_mixed_pairs"], cfg["vocab"]),
    }
    sizes = sorted(set(settings["sizes"]) | ({MILLION} if settings["include_1m"] else set()))
    models = [m for m in settings["models"] if mode == "time" or not m.startswith("cascade")]
    n_cells = sum(1 if m.startswith("cross") else len(sizes) for m in models)
    t_start = time.perf_counter()
    with torch.no_grad():
        if mode == "time":  # the process's first forward passes are slow (thread pools, kernels)
            _progress("time: warming up the process...")
            warm = [b for b in (BUILDERS[name](cfg, "bi") for name in IMPLS) if b is not None]
            for _ in range(3):
                for impl in warm:
                    impl.score(impl.encode(inputs["context"]), impl.cached(_candidates(cfg, min(sizes), "random")))
            del warm
        for model in models:
            _progress(f"{mode}: building {model}...")
            impls = {name: BUILDERS[name](cfg, model) for name in IMPLS}
            impls = {name: impl for name, impl in impls.items() if impl is not None}
            if mode == "memory" and not model.startswith("cross"):
                _first_calls(impls, inputs["context"], _candidates(cfg, min(sizes), "random"))
            cells = [len(inputs[model])] if model.startswith("cross") else sizes
            for n in cells:
                cell = _measure_cell(model, n, impls, inputs, settings, mode, out)
                out["cells"].append(cell)
                _progress(f"{mode} [{len(out['cells'])}/{n_cells}] {model:13s} N={n:>9,}: {_cell_text(cell, mode)}, "
                          f"{time.perf_counter() - t_start:.0f}s elapsed")
            del impls
            _CANDIDATES.pop("clustered", None)
            gc.collect()
    out.pop("peak_memory", None)
    out["seconds"] = time.perf_counter() - t_start
    return out


_CANDIDATES = {}  # kind -> {N: [N, d]}: one set per N and kind, shared by every model


def _candidates(cfg, n, kind):
    """Cached candidate vectors: 'random' (what every ranker row scores; any values time the
    same) or 'clustered' (the cascades, whose HNSW recall depends on the vectors)."""
    import torch

    sets = _CANDIDATES.setdefault(kind, {})
    if n not in sets:
        if kind == "random":
            sets[n] = torch.randn(n, cfg["dim"], generator=torch.Generator().manual_seed(n)) / math.sqrt(cfg["dim"])
        else:
            sets.clear()  # one size at a time: 1M clustered vectors are 1.5 GB
            sets[n] = clustered_candidates(n, cfg["dim"], CASCADE["topics"], seed=n)
    return sets[n]


def _first_calls(impls, context, cands):
    """First calls initialise lazily (thread pools, kernels): keep that out of the reading."""
    for impl in impls.values():
        impl.score(impl.encode(context), impl.cached(cands))


def _measure_cell(model, n, impls, inputs, settings, mode, out):
    """One (model, N) cell: timed runs, or each implementation's peak extra memory."""
    cfg, context = settings["config"], inputs["context"]
    info = None
    if model.startswith("cross"):
        steps = {name: (lambda impl=impl: impl.pairs(context, inputs[model])) for name, impl in impls.items()}
        memory_steps = steps
    else:
        kind = "clustered" if model.startswith("cascade") else "random"
        steps, memory_steps = {}, {}
        for name, impl in impls.items():
            cached = impl.cached(_candidates(cfg, n, kind))
            info = getattr(cached, "info", None) or info
            steps[name] = lambda impl=impl, cached=cached: impl.score(impl.encode(context), cached)
            if mode == "memory":
                memory_steps[name] = _scoring_only(impl, context, cached)
    if mode == "memory":
        if model.startswith("cross"):
            for step in steps.values():
                step()  # warm-up
        cell = {"impls": {name: {"extra_mib": out["peak_memory"](step)} for name, step in memory_steps.items()}}
    else:
        cell = _time_cell(steps, settings, n)
    cell.update(model=model, n=n)
    if model.startswith("cross"):
        cell["pairs"] = n
    if info:
        cell["info"] = info
    return cell


def _cell_text(cell, mode):
    key, unit = ("extra_mib", "MiB") if mode == "memory" else ("ms", "ms")
    parts = []
    for name, entry in cell["impls"].items():
        value = entry.get(key)
        parts.append(f"{IMPL_NAMES[name]} " + ("n/a" if value is None else f"{value:,.1f} {unit}"))
    text = ", ".join(parts) + (f" ({cell['runs']} runs)" if mode == "time" else "")
    if cell.get("info"):
        info = cell["info"]
        text += f"; HNSW build {info['hnsw_build_s']:.1f} s, recall@{info['k']} {info['recall_at_k']:.3f}"
    return text


def _scoring_only(impl, context, cached):
    """The scoring step alone: the context is encoded now, outside the memory reading."""
    encoded = impl.encode(context)
    return lambda: impl.score(encoded, cached)


def _time_cell(steps, settings, n):
    """Warm-up, then the timed runs, the implementations alternating run by run."""

    def check(name, scores):  # both really score N candidates: [1, N] scores
        if tuple(scores.shape) != (1, n):
            raise RuntimeError(f"{name}: scores of shape {tuple(scores.shape)}, expected (1, {n})")

    t0 = time.perf_counter()
    for _ in range(settings["warmup"]):
        for name, step in steps.items():
            check(name, step())
    round_seconds = (time.perf_counter() - t0) / max(1, settings["warmup"])
    impls = {name: {"runs_ms": []} for name in steps}
    runs = None
    while runs is None or len(impls["ours"]["runs_ms"]) < runs:
        t_round = time.perf_counter()
        for name, step in steps.items():
            t = time.perf_counter()
            scores = step()
            impls[name]["runs_ms"].append((time.perf_counter() - t) * 1000.0)
            check(name, scores)
            del scores
        if runs is None:  # without a warm-up, the first round sets the pace
            round_seconds = round_seconds if settings["warmup"] else time.perf_counter() - t_round
            runs = _n_runs(round_seconds, settings["repeats"], settings["cell_budget_s"])
    for entry in impls.values():
        entry["ms"] = statistics.median(entry["runs_ms"])
    return {"runs": runs, "reduced_runs": runs < settings["repeats"], "impls": impls}


def _worker_main(mode, settings_path, result_path):
    if mode == "memory":
        _fixed_mmap_threshold()
    with open(settings_path) as f:
        settings = json.load(f)
    result = measure(settings, mode)
    _write_atomic(result_path, json.dumps(result).encode())


# ---------------------------------------------------------------------------------------
# results: table, ratios, JSON, figure


def _write_atomic(path, data: bytes):
    from parlai_poly.storage import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def build_rows(timed, memory, sizes):
    """One row per (model, N): cached models as measured, cross extrapolated from its pairs,
    cross-mixed as measured (its point is the padding of those very pairs)."""
    rows = []
    extra = {(c["model"], c["n"]): c["impls"] for c in memory["cells"]}
    for cell in timed["cells"]:
        mem = extra.get((cell["model"], cell["n"]), {})
        impls = {
            name: {"ms": e["ms"], "extra_mib": mem.get(name, {}).get("extra_mib"), "runs_ms": e["runs_ms"]}
            for name, e in cell["impls"].items()
        }
        row = {"model": cell["model"], "n": cell["n"], "extrapolated": False, "runs": cell["runs"],
               "reduced_runs": cell["reduced_runs"], "impls": impls}
        if "info" in cell:
            row["info"] = cell["info"]
        if cell["model"] == "cross-mixed":
            row.update(measured_pairs=cell["pairs"], lengths=MIXED_LENGTHS)
        if cell["model"] != "cross":
            rows.append(row)
            continue
        pairs = cell["pairs"]
        for n in sorted(set(sizes) | {pairs}):
            scaled = {
                name: {
                    "ms": e["ms"] * n / pairs,
                    # memory only where measured: ParlAI scores all pairs in one forward (grows
                    # with N), ours in passes of 256 pairs (bounded)
                    "extra_mib": e["extra_mib"] if n == pairs else None,
                    "runs_ms": e["runs_ms"] if n == pairs else [],
                }
                for name, e in impls.items()
            }
            rows.append(dict(row, n=n, extrapolated=n != pairs, measured_pairs=pairs, impls=scaled))
    for row in rows:
        ours, parlai = row["impls"]["ours"]["ms"], row["impls"].get("parlai", {}).get("ms")
        row["speedup_parlai_over_ours"] = parlai / ours if parlai else None
        bf16 = row["impls"].get("ours_bf16", {}).get("ms")
        row["speedup_parlai_over_ours_bf16"] = parlai / bf16 if parlai and bf16 else None
        row["paper_cpu_ms_bert_base"] = PAPER_CPU_MS.get(row["model"], {}).get(row["n"])
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order[r["model"]], r["n"]))
    return rows


def _find(rows, model, n):
    for row in rows:
        if row["model"] == model and row["n"] == n:
            return row
    return None


def _ratio(value, target, op, **info):
    meets = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"value": value, "target": f"{op} {target:.3g}", "meets_target": meets, **info}


def compute_ratios(rows, sizes):
    """The figures the issue sets targets for (reported, never asserted)."""
    ref_n = 100000 if 100000 in sizes else max(sizes)
    ratios = {}
    poly64, bi = _find(rows, "poly-64", ref_n), _find(rows, "bi", ref_n)

    def ms(row, impl):
        return row and row["impls"].get(impl, {}).get("ms")

    for impl, suffix, label in (("ours", "", "ours"), ("ours_bf16", "_bf16", "ours with --score-dtype bfloat16")):
        ratios[f"poly64_speed_parlai_over_ours{suffix}"] = _ratio(
            ms(poly64, "parlai") and ms(poly64, impl) and ms(poly64, "parlai") / ms(poly64, impl), 3, ">=", n=ref_n,
            what=f"ParlAI's ms per context / {label}, poly-64",
        )
        ratios[f"poly64{suffix}_over_bi_ours"] = _ratio(
            ms(poly64, impl) and ms(bi, "ours") and ms(poly64, impl) / ms(bi, "ours"), 2, "<=", n=ref_n,
            what=f"poly-64 ({label}) ms per context / our bi-encoder's",
        )
    per_m = {}
    for model in ("poly-16", "poly-64", "poly-360"):
        row = _find(rows, model, ref_n)
        if row and row["impls"]["ours"]["extra_mib"] is not None and row["impls"]["parlai"]["extra_mib"]:
            per_m[model] = row["impls"]["ours"]["extra_mib"] / row["impls"]["parlai"]["extra_mib"]
    ratios["poly_extra_memory_ours_over_parlai"] = _ratio(
        max(per_m.values()) if per_m else None, 1 / 3, "<=", n=ref_n, per_model=per_m,
        what="peak extra memory of scoring, ours / ParlAI's (the worst poly size)",
    )
    at_1m = {
        f"{r['model']} {impl}": e["extra_mib"] / 1024
        for r in rows
        if r["n"] == MILLION
        for impl, e in r["impls"].items()
        if impl != "parlai" and e.get("extra_mib") is not None
    }
    ratios["ours_extra_memory_1m_gib"] = _ratio(
        max(at_1m.values()) if at_1m else None, 2, "<=", n=MILLION, per_model=at_1m,
        what="our peak extra memory of scoring 1M cached candidates, GiB (the worst of bi/poly)"
        + ("" if at_1m else "; not measured: run with --include-1m"),
    )
    for model, what in (("cross", "same-length pairs"), ("cross-mixed", "mixed-length pairs")):
        cross = next((r for r in rows if r["model"] == model and not r["extrapolated"]), None)
        name = "cross_throughput_ours_over_parlai" + ("_mixed" if model == "cross-mixed" else "")
        ratios[name] = _ratio(
            cross and cross["speedup_parlai_over_ours"], 1.5, ">=", n=cross and cross["n"],
            what=f"cross-encoder pairs per second, ours / ParlAI's ({what}, measured)",
        )
    return ratios


def cascade_summary(rows):
    """Per N: the cascades' ms per context, the HNSW build time and its recall@K."""
    out = {}
    for row in rows:
        if row["model"].startswith("cascade"):
            entry = out.setdefault(str(row["n"]), {})
            entry[row["model"].split("-")[1] + "_ms"] = row["impls"]["ours"]["ms"]
            entry.update(row.get("info", {}))
    return out


def _fmt_ms(ms):
    if ms is None:
        return "-"
    if ms >= 100000:
        return f"{ms / 1000:,.0f}s"
    if ms >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.1f}"


def _fmt_mib(mib):
    return "-" if mib is None else f"{mib:,.0f}"


def _fmt_ratio(value):
    return f"{value:.2f}x" if value else "-"


def _table_row(r):
    mark = "*" if r["extrapolated"] else " "
    runs = "-" if r["extrapolated"] else f"{r['runs']}{'!' if r['reduced_runs'] else ''}"
    paper = r["paper_cpu_ms_bert_base"]
    impls = r["impls"]
    ms = {name: _fmt_ms(impls[name]["ms"]) + mark if name in impls else "-" for name in IMPLS}
    mib = {name: _fmt_mib(impls[name]["extra_mib"]) if name in impls else "-" for name in IMPLS}
    return (
        f"{r['model']:13s} {r['n']:>10,} {ms['ours']:>10s} {ms['ours_bf16']:>10s} {ms['parlai']:>10s} "
        f"{_fmt_ratio(r['speedup_parlai_over_ours']):>11s} {_fmt_ratio(r['speedup_parlai_over_ours_bf16']):>11s} "
        f"{mib['ours']:>9s} {mib['ours_bf16']:>9s} {mib['parlai']:>10s} {runs:>5s}  "
        f"{_fmt_ms(paper) if paper else '':>12s}"
    )


def render_table(result):
    s = result["setup"]
    lines = [
        f"Scoring time per context (ms), one {s['context_tokens']}-token context against N cached "
        f"candidates; {s['config_name']} size ({s['config']['layers']} layers, d={s['config']['dim']}, "
        f"{s['config']['heads']} heads, FFN {s['config']['ffn']}), {s['torch_threads']} torch threads, "
        f"median of {s['repeats']} runs after {s['warmup']} warm-up.",
        f"Load average at start {s['loadavg_start']}, at end {s['loadavg_end']}, {s['cpu_count']} CPUs.",
        "",
    ]
    header = (f"{'model':13s} {'N':>10s} {'ours ms':>10s} {'bf16 ms':>10s} {'ParlAI ms':>10s} {'ParlAI/ours':>11s} "
              f"{'ParlAI/bf16':>11s} {'ours MiB':>9s} {'bf16 MiB':>9s} {'ParlAI MiB':>10s} {'runs':>5s}  "
              f"{'paper CPU ms':>12s}")
    lines += [header, "-" * len(header)] + [_table_row(r) for r in result["rows"]]
    lines += [""] + _table_notes(result)
    lines += ["", "Targets (reported, not enforced):"]
    for name, r in result["ratios"].items():
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        verdict = {True: "meets", False: "misses", None: "n/a"}[r["meets_target"]]
        n = f" at N={r['n']:,}" if r.get("n") else ""
        lines.append(f"  {name:40s} {value:>8s}  target {r['target']:8s} {verdict:6s} {r['what']}{n}")
    return "\n".join(lines) + "\n"


def _table_notes(result):
    s, rows = result["setup"], result["rows"]
    notes = []
    cross = next((r for r in rows if r["model"] == "cross"), None)
    if cross:
        notes.append(f"* extrapolated linearly from {cross['measured_pairs']} measured pairs "
                     f"({s['context_tokens']}-token context + {s['cand_tokens']}-token candidate each).")
    mixed = next((r for r in rows if r["model"] == "cross-mixed"), None)
    if mixed:
        m = MIXED_LENGTHS
        notes.append(f"cross-mixed: {mixed['measured_pairs']} pairs of the {s['context_tokens']}-token context and a "
                     f"candidate of {m['low']}-{m['high']} tokens, log-normal like CCC test responses (median 18); "
                     "ParlAI pads every pair to the longest, ours sorts them by length (passes of 256).")
    for n, c in result.get("cascade", {}).items():
        hnsw = (f"; HNSW (M {c['hnsw_m']}, efConstruction {c['hnsw_ef_construction']}, efSearch "
                f"{c['hnsw_ef_search']}) built in {c['hnsw_build_s']:.1f} s, recall@{c['k']} {c['recall_at_k']:.3f} "
                f"against exact over {c['recall_queries']} queries") if "hnsw_build_s" in c else ""
        notes.append(f"cascade N={int(n):,}: bi top-{CASCADE['retrieve_top_k']} -> {CASCADE['poly']} -> cross top-"
                     f"{CASCADE['rerank_top_k']}, exact {_fmt_ms(c.get('exact_ms'))} ms, hnsw "
                     f"{_fmt_ms(c.get('hnsw_ms'))} ms per context{hnsw} (clustered candidates).")
        if "by_ef_search" in c:
            trade = ", ".join(f"{ef}: {v['recall']:.3f} in {v['search_ms']:.2f} ms" for ef, v in c["by_ef_search"].items())
            notes.append(f"  recall@{c['k']} by efSearch: {trade}")
    if any(r["reduced_runs"] and not r["extrapolated"] for r in rows):
        notes.append(f"! fewer runs than the {s['repeats']} asked: the cell's runs were cut to fit "
                     f"--cell-budget-s {s['cell_budget_s']:g} (at least 3).")
    notes.append(f"bf16: our poly-encoder with --score-dtype bfloat16 (products in bfloat16, the top "
                 f"{BF16_RESCORE_TOP_K} rescored in float32). MiB: peak extra resident memory of the scoring step "
                 "(see memory_method in results.json). paper: Table 5, BERT-base size on a many-core CPU.")
    cal = result["memory_calibration_mib"]
    if cal["measured"] is not None:
        notes.append(f"Memory check: a {cal['allocated']} MiB tensor measures {cal['measured']:.0f} MiB.")
    return notes


PLOT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray", "black")
PLOT_STYLES = {"ours": ("-", "o"), "ours_bf16": (":", "^"), "parlai": ("--", "s")}


def render_plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = dict(zip(MODELS, PLOT_COLORS))
    for model in MODELS:
        rows = [r for r in result["rows"] if r["model"] == model]
        for impl, (style, marker) in PLOT_STYLES.items():
            points = [(r["n"], r["impls"][impl]["ms"], r["extrapolated"]) for r in rows if impl in r["impls"]]
            if not points:
                continue
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, style, color=colors[model], label=f"{model} ({IMPL_NAMES[impl]})")
            measured = [(x, y) for x, y, extrapolated in points if not extrapolated]
            extra = [(x, y) for x, y, extrapolated in points if extrapolated]
            if measured:
                ax.plot(*zip(*measured), marker, color=colors[model])
            if extra:
                ax.plot(*zip(*extra), marker, color=colors[model], markerfacecolor="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cached candidates N (cross: pairs scored)")
    ax.set_ylabel("ms per context")
    s = result["setup"]
    ax.set_title(f"Scoring one context against N candidates, {s['config_name']} size, "
                 f"{s['torch_threads']} threads\nours solid, ours bf16 dotted, ParlAI 1.7.2 dashed; "
                 "open markers: extrapolated", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    from parlai_poly.storage import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scoring_speed",
        description="Reproduce the Poly-encoder paper's Table 5 (ms per context against N cached "
        "candidates) for our modules and ParlAI 1.7.2's, side by side.",
    )
    p.add_argument("--sizes", default=None, help="comma-separated N of cached candidates (default 1000,100000)")
    p.add_argument("--include-1m", action=argparse.BooleanOptionalAction, default=None,
                   help="also 1,000,000 cached candidates for bi and poly (default: yes, but not with --quick)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median reported (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                   help="OMP_WAIT_POLICY of the worker (default passive: idle OpenMP threads sleep "
                   "instead of spinning, which keeps timings sane when other jobs share the cores; "
                   "inherit: leave the environment as it is)")
    p.add_argument("--context-tokens", type=int, default=32)
    p.add_argument("--cand-tokens", type=int, default=16, help="candidate length for cross pairs")
    p.add_argument("--cross-pairs", type=int, default=None, help="cross-encoder pairs measured (default 100)")
    p.add_argument("--cross-mixed-pairs", type=int, default=None,
                   help="mixed-length cross-encoder pairs measured (default 1000: several of our passes of 256)")
    p.add_argument("--cell-budget-s", type=float, default=40.0,
                   help="seconds of timed runs per cell (both implementations); slower cells get fewer "
                   "runs, at least 3 (default 40)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and sizes, for a smoke test (numbers meaningless)")
    p.add_argument("--in-process", action="store_true", help="measure in this process, not a fresh one")
    p.add_argument("--out", default="runs/benchmark", help="output folder (default runs/benchmark)")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "SETTINGS", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models {args.models}: choose from {','.join(MODELS)}")
    default_sizes = "100,1000" if args.quick else "1000,100000"
    try:
        sizes = sorted({int(x.replace("_", "")) for x in (args.sizes or default_sizes).split(",") if x.strip()})
    except ValueError:
        p.error(f"--sizes {args.sizes}: comma-separated integers")
    if not sizes or min(sizes) < 1:
        p.error("--sizes: positive integers")
    args.models, args.sizes = [m for m in MODELS if m in models], sizes
    if args.include_1m is None:
        args.include_1m = not args.quick
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.threads = args.threads or (1 if args.quick else 2)
    args.cross_pairs = args.cross_pairs or (8 if args.quick else 100)
    args.cross_mixed_pairs = args.cross_mixed_pairs or (8 if args.quick else 1000)
    if min(args.repeats, args.threads, args.cross_pairs, args.cross_mixed_pairs) < 1 or args.warmup < 0:
        p.error("--repeats, --threads, --cross-pairs and --cross-mixed-pairs must be positive, --warmup non-negative")
    return args


def _run_worker(mode, settings, args):
    """One fresh process per mode: timing with the default allocator, memory with PeakMemory's."""
    with tempfile.TemporaryDirectory() as tmp:
        settings_path, result_path = os.path.join(tmp, "settings.json"), os.path.join(tmp, "result.json")
        with open(settings_path, "w") as f:
            json.dump(settings, f)
        env = dict(os.environ)
        threads = str(args.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
        if args.omp_wait_policy != "inherit":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        if mode == "memory":
            env.update(MALLOC_MMAP_THRESHOLD_=str(64 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
        cmd = [sys.executable, "-m", "benchmarks.scoring_speed", "--worker", mode, settings_path, result_path]
        subprocess.run(cmd, env=env, check=True, cwd=REPO_ROOT)
        with open(result_path) as f:
            return json.load(f)


def run(args):
    config_name, config = ("tiny", TINY) if args.quick else ("MiniLM", MINILM)
    settings = {
        "config": config,
        "config_name": config_name,
        "models": args.models,
        "sizes": args.sizes,
        "include_1m": args.include_1m,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "context_tokens": args.context_tokens,
        "cand_tokens": args.cand_tokens,
        "cross_pairs": args.cross_pairs,
        "cross_mixed_pairs": args.cross_mixed_pairs,
        "cell_budget_s": args.cell_budget_s,
        "omp_wait_policy": (os.environ.get("OMP_WAIT_POLICY") if args.omp_wait_policy == "inherit" or args.in_process
                            else args.omp_wait_policy.upper()),
    }
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    started = time.time()
    _progress(f"benchmark: {config_name} size, models {','.join(args.models)}, N {args.sizes}"
              f"{' + 1M (bi/poly/cascades)' if args.include_1m else ''}, {args.threads} threads; load average "
              f"{loadavg_start}")
    if args.in_process:
        timed = measure(settings, "time")
        _fixed_mmap_threshold()
        memory = measure(settings, "memory")
    else:
        timed, memory = (_run_worker(mode, settings, args) for mode in ("time", "memory"))
    measured = {**timed, **{k: memory[k] for k in ("memory_available", "memory_calibration_mib")}}
    rows = build_rows(timed, memory, args.sizes)
    result = {
        "setup": {
            **settings,
            "torch_threads": measured["torch_threads"],
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": measured["versions"],
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.time() - started, 1),
            "seconds_timing": round(timed["seconds"], 1),
            "seconds_memory": round(memory["seconds"], 1),
            "per_context": "encode one context + score it against N cached candidate vectors (random "
            "tensors of each implementation's cached shape: ours [N, d], ParlAI's bi [N, d], poly "
            "[1, N, d]); cross: pair forwards, measured on cross_pairs pairs, extrapolated linearly; "
            "cross-mixed: cross_mixed_pairs pairs of mixed lengths (MIXED_LENGTHS), as measured; "
            "cascade-*: bi top-K (exact or HNSW) -> poly-64 on K -> cross on the best 10, over "
            "clustered unit vectors (recall depends on the vectors, timing hardly)",
            "ours_modules": "parlai_poly.modules (BiEncoderModule, PolyEncoderModule codes/basic/mean, "
            "CrossEncoderModule through CrossEncoderAgent.score_pairs: sorted by length, passes of 256 "
            "pairs) on a randomly initialised transformers BertModel; ours_bf16: the same poly with "
            "bfloat16 candidates and the top 100 rescored in float32 (--score-dtype bfloat16)",
            "mixed_lengths": MIXED_LENGTHS,
            "cascade": CASCADE,
            "parlai_modules": "parlai.agents.transformer: TransformerMemNetModel + TransformerRankerAgent._score (bi), "
            "PolyEncoderModule codes/basic (poly), CrossencoderAgent.score_candidates + CrossEncoderModule "
            "(cross); variant xlm, gelu, learned positions, 2 segments; randomly initialised",
        },
        "memory_method": MEMORY_METHOD,
        "memory_available": measured["memory_available"],
        "memory_calibration_mib": measured["memory_calibration_mib"],
        "rows": rows,
    }
    result["ratios"] = compute_ratios(rows, args.sizes)
    result["cascade"] = cascade_summary(rows)
    table = render_table(result)
    out = args.out
    os.makedirs(out, exist_ok=True)
    _write_atomic(os.path.join(out, "results.json"), (json.dumps(result, indent=1) + "\n").encode())
    _write_atomic(os.path.join(out, "table.txt"), table.encode())
    render_plot(result, os.path.join(out, "benchmark.png"))
    print(table, flush=True)
    print(f"wrote {os.path.join(out, 'results.json')}, table.txt and benchmark.png "
          f"({result['setup']['seconds']:.0f} s)", flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        _worker_main(*args.worker)
        return None
    return run(args)


if __name__ == "__main__":
    main()
