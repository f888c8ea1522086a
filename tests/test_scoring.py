"""Scoring many candidates: chunked scores equal the whole and the naive formula; top-k
ranking gives what a full sort gives, with rank and MRR from the full scores; the fused
passes equal the eager ones; bfloat16 and int8 stores score within their tolerance and
rescoring gives float32's top."""
import math

import pytest
import torch
from safetensors import safe_open

from helpers import make_agent
from parlai_poly.modules import BiEncoderModule, PolyEncoderModule
from parlai_poly.modules.attention import ATTENTION_TYPES
from parlai_poly.modules.poly_encoder import POLY_TYPES
from test_modules import FakeEncoder, naive_poly_scores

CLOSE = dict(rtol=1e-5, atol=1e-5)


def poly_module(attention, poly_type):
    torch.manual_seed(0)
    return PolyEncoderModule(
        FakeEncoder(), poly_type=poly_type, n_codes=5, codes_attention=attention, codes_heads=2,
        poly_attention=attention, poly_heads=2,
    ).eval()


def context_of(module):
    ids = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])  # first context shorter than m
    return module.encode_context(ids)


def count_chunks(monkeypatch):
    """Count the chunks of candidates scoring takes (the fused and the eager path alike)."""
    from parlai_poly.modules import bi_encoder

    calls = []
    original = bi_encoder.candidate_chunks

    def counting(candidates, size, *how):
        for start, rows, scales in original(candidates, size, *how):
            calls.append(rows.size(-2))
            yield start, rows, scales

    monkeypatch.setattr(bi_encoder, "candidate_chunks", counting)
    return calls


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
@pytest.mark.parametrize("poly_type", POLY_TYPES)
def test_chunked_poly_scores_equal_whole_and_naive(attention, poly_type, fused, monkeypatch):
    module = poly_module(attention, poly_type)
    module.score_fused = fused
    with torch.no_grad():
        context, mask = context_of(module)
        for cands in (torch.randn(23, 8), torch.randn(2, 11, 8)):  # shared [N, d], per example [B, N, d]
            n = cands.size(-2)
            whole = module.score(context, mask, cands, chunk_size=n)
            torch.testing.assert_close(whole, naive_poly_scores(module, context, mask, cands), **CLOSE)
            for chunk in (1, 4, 7):
                torch.testing.assert_close(module.score(context, mask, cands, chunk_size=chunk), whole, **CLOSE)
        # the automatic chunk size: a tiny memory budget makes several chunks of 23 candidates
        cands = torch.randn(23, 8)
        # per candidate, float32 tensors of [B, m] (B = 2, m = 5; multihead: per head, H = 2):
        # eager 4 (multihead 5 per head), fused only the similarities (multihead: logits and values)
        per_candidate = 2 * 5 * 4 * ((2 * 2 if fused else 5 * 2) if attention == "multihead" else (1 if fused else 4))
        module.score_chunk_bytes = 3 * per_candidate  # 3 per chunk
        chunks = count_chunks(monkeypatch)
        scores = module.score(context, mask, cands)
    assert len(chunks) == 8 and sum(chunks) == 23 and max(chunks) == 3
    torch.testing.assert_close(scores, naive_poly_scores(module, context, mask, cands), **CLOSE)


@pytest.mark.parametrize("attention", ["basic", "multihead"])
def test_chunked_poly_gradients_equal_whole(attention):
    """Training scores batch candidates the same way: gradients must not depend on chunking."""
    module = poly_module(attention, "codes")
    grads = []
    for chunk in (None, 3):
        module.zero_grad()
        context, mask = context_of(module)
        cands = torch.randn(10, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        module.score(context, mask, cands, chunk_size=chunk).logsumexp(-1).sum().backward()
        grads.append([cands.grad.clone()] + [p.grad.clone() for p in module.parameters() if p.grad is not None])
    for whole, chunked in zip(*grads):
        torch.testing.assert_close(chunked, whole, **CLOSE)


def test_multihead_layout_without_the_fold_is_scored_in_chunks_too():
    """Key/value biases do not fold into two matrix products: torch's attention, per chunk."""
    module = poly_module("multihead", "n_first")
    module.poly_attention.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True).eval()
    with torch.no_grad():
        context, mask = context_of(module)
        cands = torch.randn(9, 8)
        naive = naive_poly_scores(module, context, mask, cands)
        torch.testing.assert_close(module.score(context, mask, cands, chunk_size=2), naive, **CLOSE)


def test_chunked_bi_scores_are_one_gemm_per_chunk():
    module = BiEncoderModule(FakeEncoder())
    context = torch.randn(3, 8)
    for cands in (torch.randn(17, 8), torch.randn(3, 17, 8)):
        pick = (lambda b, j: cands[j]) if cands.dim() == 2 else (lambda b, j: cands[b, j])
        naive = torch.tensor([[float(context[b] @ pick(b, j)) for j in range(17)] for b in range(3)])
        for chunk in (None, 1, 5, 17):
            torch.testing.assert_close(module.score(context, cands, chunk_size=chunk), naive, **CLOSE)
    module.score_chunk_bytes = 3 * 4 * 4  # 4 candidates per chunk for a batch of 3 float32 contexts
    torch.testing.assert_close(module.score(context, cands[0]), context @ cands[0].t(), **CLOSE)


# ---- top-k ranking in the agent ---------------------------------------------------------
@pytest.fixture(scope="module", params=["bi", "poly"])
def ranker(request, tmp_path_factory, tiny_backbone):
    """An untrained agent over 150 fixed candidates (more than the 100 predictions shown)."""
    folder = tmp_path_factory.mktemp("topk")
    cands = [f"reply number {i} about {['cats', 'dogs', 'rain', 'tea'][i % 4]}" for i in range(150)]
    path = folder / "cands.txt"
    path.write_text("\n".join(cands) + "\n")
    extra = ["--poly-n-codes", "4"] if request.param == "poly" else []
    return make_agent(
        "-m", f"parlai_poly.agents:{request.param}", "--hf-model", tiny_backbone, "-dt", "valid",
        "-ecands", "fixed", "-fcp", str(path), *extra,
    )


def ask(agent, text, label, **opt):
    saved = {k: agent.opt.get(k) for k in opt}
    agent.opt.update(opt)
    try:
        agent.reset()
        agent.observe({"text": text, "eval_labels": [label], "episode_done": True})
        reply = agent.act()
    finally:
        agent.opt.update(saved)
    metrics = {k: reply["metrics"][k].value() for k in ("rank", "mrr")}
    return reply, metrics, agent._last_scores[0].clone()


@pytest.mark.parametrize(
    "text, label",
    [
        ("tell me about cats", "reply number 12 about cats"),
        ("and dogs", "reply number 5 about dogs"),
        ("what about rain", "reply number 98 about rain"),
    ],
)
def test_top_k_ranking_equals_a_full_sort(ranker, text, label, monkeypatch):
    ks = []
    eval_top_k = ranker.eval_top_k
    monkeypatch.setattr(ranker, "eval_top_k", lambda: ks.append(eval_top_k()) or ks[-1])
    topk_reply, topk_metrics, scores = ask(ranker, text, label)
    assert ks == [100 + 1]  # the predictions shown, plus the one history line it may block
    full_reply, full_metrics, _ = ask(ranker, text, label, return_cand_scores=True)  # ParlAI's full sort
    assert ks[-1] == 0 and len(full_reply["sorted_scores"]) == 150
    assert topk_reply["text_candidates"] == full_reply["text_candidates"]
    assert len(topk_reply["text_candidates"]) == 100 and topk_reply["text"] == full_reply["text"]

    label_index = ranker.fixed_candidates.index(label)
    above = int((scores > scores[label_index]).sum())
    ties = int((scores == scores[label_index]).sum()) - 1
    assert topk_metrics["rank"] == pytest.approx(1 + above + ties / 2)
    assert topk_metrics["mrr"] == pytest.approx(sum(1 / (1 + above + j) for j in range(ties + 1)) / (ties + 1))
    if ties == 0:  # ParlAI's full sort agrees wherever the order is not a coin toss
        assert full_metrics == pytest.approx(topk_metrics)

    # an explicit --rank-top-k smaller than the label's rank: ParlAI would report rank N + 1
    _, small_k, _ = ask(ranker, text, label, rank_top_k=1)
    assert small_k == pytest.approx(topk_metrics)
    assert math.isfinite(small_k["mrr"])


def test_rank_and_mrr_count_ties_as_a_random_draw(ranker):
    """A label tied with t others: the mean rank and reciprocal rank over their t + 1 orders."""
    ranker._last_scores = torch.tensor(
        [[5.0, 3.0, 3.0, 3.0, 1.0], [2.0, 9.0, 1.0, 0.0, 0.0], [0.0, 0.0, 7.0, 1.0, 0.0]]
    )
    ranker._last_candidates = (None, None, torch.tensor([1, 1, 4]))
    ranker._exact_ranks = None
    metrics = ranker.exact_rank_metrics()
    assert [m.value() for m in metrics["rank"]] == pytest.approx([3.0, 1.0, 4.0])  # 1 + above + ties / 2
    expected_mrr = [(1 / 2 + 1 / 3 + 1 / 4) / 3, 1.0, (1 / 3 + 1 / 4 + 1 / 5) / 3]
    assert [m.value() for m in metrics["mrr"]] == pytest.approx(expected_mrr)


# ---- bfloat16 products ------------------------------------------------------------------
# Stated tolerance: a bfloat16 score is within 1% of the largest |score| of its context
# (each similarity is rounded to 8 significant bits; measured at most 0.2% on MiniLM-size
# random and trained data). Rescored top candidates are float32's to float32's rounding.
BF16_TOLERANCE = 0.01


def wide_poly_module(attention):
    torch.manual_seed(0)
    return PolyEncoderModule(
        FakeEncoder(dim=64, vocab=100), n_codes=16, codes_attention="basic", poly_attention=attention, poly_heads=4
    ).eval()


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_bfloat16_scores_stay_within_tolerance_and_rescoring_restores_the_top(attention):
    from parlai_poly.modules.stored import rescore_top

    module = wide_poly_module(attention)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 12), generator=gen)
    with torch.no_grad():
        context, mask = module.encode_context(ids)
        for cands in (torch.randn(4000, 64, generator=gen), torch.randn(3, 500, 64, generator=gen)):
            exact = module.score(context, mask, cands)
            fast = module.score(context, mask, cands.bfloat16())
            assert fast.dtype == torch.float32 and fast.shape == exact.shape
            error = (fast - exact).abs().max(-1).values
            assert (error <= BF16_TOLERANCE * exact.abs().max(-1).values).all(), error
            assert (error > 0).any()  # really computed in bfloat16
            if cands.dim() == 3:
                continue
            fixed = rescore_top(fast, lambda top: module.score(context, mask, top), cands, 20)
            top = fixed.topk(10, dim=1)
            assert torch.equal(top.indices, exact.topk(10, dim=1).indices)
            torch.testing.assert_close(top.values, exact.gather(1, top.indices), **CLOSE)


@pytest.mark.parametrize("fused", [False, True])
def test_bfloat16_scoring_is_chunked_within_the_budget(fused, monkeypatch):
    module = wide_poly_module("basic")
    module.score_fused = fused
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (2, 12)))
        cands = torch.randn(1000, 64).bfloat16()
        whole = module.score(context, mask, cands, chunk_size=1000)
        # basic, per candidate: eager 4 float32 tensors of [B, m] whatever the products' dtype;
        # fused only the similarities, in the products' bfloat16
        module.score_chunk_bytes = 100 * 2 * 16 * (2 if fused else 4 * 4)  # 100 candidates per chunk
        chunks = count_chunks(monkeypatch)
        scores = module.score(context, mask, cands)
    assert len(chunks) == 10 and max(chunks) == 100
    torch.testing.assert_close(scores, whole, **CLOSE)


@pytest.mark.parametrize("fused", [False, True])
def test_default_chunks_on_cpu_fit_a_cache_sized_budget(fused, monkeypatch):
    from parlai_poly.modules.bi_encoder import CPU_SCORE_CHUNK_BYTES

    module = wide_poly_module("basic")
    module.score_fused = fused
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (1, 12)))
        chunks = count_chunks(monkeypatch)
        module.score(context, mask, torch.randn(100000, 64))
    per_candidate = 16 * 4 * (1 if fused else 4)  # m = 16 float32 similarities (eager: 4 tensors of them)
    assert max(chunks) == CPU_SCORE_CHUNK_BYTES // per_candidate and sum(chunks) == 100000


@pytest.fixture(scope="module")
def poly_rankers(tmp_path_factory, tiny_backbone):
    """float32 and bfloat16 scoring of one untrained poly-encoder over 150 fixed candidates."""
    folder = tmp_path_factory.mktemp("bf16")
    path = folder / "cands.txt"
    path.write_text("".join(f"reply number {i} about {['cats', 'dogs', 'rain', 'tea'][i % 4]}\n" for i in range(150)))
    model_file = str(folder / "poly")
    make_agent("-m", "parlai_poly.agents:poly", "--hf-model", tiny_backbone, "--poly-n-codes", "4").save(model_file)
    from helpers import reload_agent

    opts = dict(eval_candidates="fixed", fixed_candidates_path=str(path), datatype="valid")
    return (
        reload_agent(model_file, score_dtype="float32", **opts),
        reload_agent(model_file, score_dtype="bfloat16", bf16_rescore_top_k=10, **opts),
    )


def test_bfloat16_agent_ranks_its_top_like_float32(poly_rankers):
    exact_agent, fast_agent = poly_rankers
    for text in ("tell me about cats", "and the rain"):
        exact_reply, _, exact = ask(exact_agent, text, "reply number 12 about cats")
        fast_reply, _, fast = ask(fast_agent, text, "reply number 12 about cats")
        assert fast_reply["text_candidates"][:10] == exact_reply["text_candidates"][:10]
        top = exact.topk(10).indices
        torch.testing.assert_close(fast[top], exact[top], **CLOSE)  # rescored in float32
        assert (fast - exact).abs().max() <= BF16_TOLERANCE * exact.abs().max()
    source, copy = fast_agent._bf16_cache
    assert source() is fast_agent.fixed_candidate_encs and copy.values.dtype == torch.bfloat16
    ask(fast_agent, "more tea", "reply number 3 about tea")
    assert fast_agent._bf16_cache[1] is copy  # made once, not per batch
    assert not hasattr(exact_agent, "_bf16_cache")


def test_auto_score_dtype_turns_to_bfloat16_only_where_it_pays(poly_rankers, monkeypatch):
    from parlai_poly import precision

    agent = poly_rankers[0]
    monkeypatch.setitem(agent.opt, "score_dtype", "auto")
    monkeypatch.setattr(precision, "bfloat16_products_pay", lambda: True)
    cands = agent.fixed_candidate_encs.clone()  # cached candidates no store keeps (vocab ones, say)
    # 150: under BF16_AUTO_MIN_CANDIDATES, float32 exactly
    assert agent._score_dtype(len(cands)) == torch.float32 and agent._bfloat16_copy(cands) is None
    monkeypatch.setattr(precision, "BF16_AUTO_MIN_CANDIDATES", 100)
    assert agent._bfloat16_copy(cands).values.dtype == torch.bfloat16
    # the fixed candidates themselves: with auto, their store's dtype decides (float32 here)
    assert agent._bfloat16_copy(agent.fixed_candidate_encs) is None
    monkeypatch.setattr(precision, "bfloat16_products_pay", lambda: False)  # timed slower, or emulated
    assert agent._score_dtype(len(cands)) == torch.float32
    monkeypatch.setitem(agent.opt, "score_dtype", "bfloat16")  # asked for: at any N over the rescored
    assert agent._score_dtype(len(cands)) == torch.bfloat16


# ---- the fused poly pass ----------------------------------------------------------------
# Stated tolerance: the fused pass (an exp-sum compiled into one loop) equals the eager
# softmax path to float32 rounding, 1e-5 relative and absolute (CLOSE), on any input dtype.
@pytest.mark.parametrize("codes_attention", ATTENTION_TYPES)
@pytest.mark.parametrize("poly_attention", ATTENTION_TYPES)
@pytest.mark.parametrize("poly_type", POLY_TYPES)
def test_fused_poly_pass_equals_the_float32_path(codes_attention, poly_attention, poly_type):
    torch.manual_seed(0)
    module = PolyEncoderModule(
        FakeEncoder(dim=16, vocab=100), poly_type=poly_type, n_codes=6, codes_attention=codes_attention,
        codes_heads=2, poly_attention=poly_attention, poly_heads=4,
    ).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 9), generator=gen)
    ids[0, 4:] = 0  # a context shorter than m: n_first masks context vectors
    with torch.no_grad():
        context, mask = module.encode_context(ids)
        for cands in (torch.randn(300, 16, generator=gen), torch.randn(3, 70, 16, generator=gen)):
            for dtype in (torch.float32, torch.bfloat16):  # bfloat16: the same bfloat16 similarities
                module.score_fused = False
                eager = module.score(context, mask, cands.to(dtype), chunk_size=64)
                module.score_fused = True
                fused = module.score(context, mask, cands.to(dtype), chunk_size=64)
                assert fused.dtype == torch.float32
                torch.testing.assert_close(fused, eager, **CLOSE)


def test_fused_pass_runs_compiled_and_by_default_only_over_many_candidates(monkeypatch):
    """Compiled where torch.compile works (here), and by default only from FUSED_MIN_CANDIDATES
    on: below it the eager pass costs less than compiling would."""
    from parlai_poly.modules import poly_encoder
    from parlai_poly.modules.stored import FUSED_MIN_CANDIDATES

    module = wide_poly_module("basic")
    assert module.score_fused is None  # the default: decided by N
    with torch.no_grad():
        assert not module.fusing(FUSED_MIN_CANDIDATES - 1) and module.fusing(FUSED_MIN_CANDIDATES)
        context, mask = module.encode_context(torch.randint(1, 100, (1, 12)))
        module.score(context, mask, torch.randn(FUSED_MIN_CANDIDATES, 64))
    assert not module.fusing(FUSED_MIN_CANDIDATES)  # a gradient is wanted: eager, differentiable
    fused = poly_encoder.fused_attention_sum
    assert fused.enabled and fused.failed is None and fused._compiled  # compiled, not fallen back
    monkeypatch.setenv("PARLAI_POLY_FUSED", "0")
    assert not fused.enabled


def no_compiler(fn, **kwargs):
    """torch.compile as on a machine without a C++ compiler: the compiled function fails."""

    def fail(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    return fail


def test_a_pass_that_cannot_compile_runs_eagerly_with_one_warning(monkeypatch):
    """No C++ compiler, say: the same function runs eagerly, and says so once; an error of
    the call itself is raised as it is, without turning compiling off."""
    from parlai_poly.modules.poly_encoder import attention_sum
    from parlai_poly.modules.stored import CompiledOrEager

    monkeypatch.setattr(torch, "compile", no_compiler)
    fused = CompiledOrEager(attention_sum)
    sims = torch.randn(5, 2, 4)
    with pytest.raises(RuntimeError, match="must match the size"):
        fused(sims, torch.randn(5, 2, 3), 1.0, None, None, None)  # wrong shapes: the call's own error
    assert fused.failed is None
    with pytest.warns(UserWarning, match="torch.compile of attention_sum failed .*InvalidCxxCompiler"):
        out = fused(sims, sims, 1.0, None, None, None)
    torch.testing.assert_close(out, attention_sum(sims, sims, 1.0, None, None, None))
    assert fused.failed and not fused.enabled
    torch.testing.assert_close(fused(sims, sims, 0.5, None, None, None), attention_sum(sims, sims, 0.5, None, None, None))


# ---- stored candidates: bfloat16, int8, and float32 rescoring -----------------------------
def test_int8_quantization_error_is_within_its_bound():
    from parlai_poly.modules.stored import StoredCandidates, int8_error_bound, quantize_int8

    gen = torch.Generator().manual_seed(4)
    encs = torch.randn(2000, 384, generator=gen) * torch.rand(2000, 1, generator=gen)
    encs[7] = 0  # a zero vector: scale 1, stored exactly
    values, scales = quantize_int8(encs)
    assert values.dtype == torch.int8 and values.abs().max() == 127 and scales[7] == 1 and not values[7].any()
    error = (values.float() * scales.unsqueeze(-1) - encs).abs()
    assert (error <= scales.unsqueeze(-1) / 2 * (1 + 1e-5)).all()  # each number within half a step
    context = torch.randn(5, 384, generator=gen)
    stored = StoredCandidates(values, scales)
    exact = context @ encs.t()
    approx = context @ stored.dequantize().t()
    bound = int8_error_bound(scales, context)
    assert ((approx - exact).abs() <= bound * (1 + 1e-5) + 1e-5).all()
    assert (approx - exact).abs().max() > 0  # really quantized


def test_bi_fused_pass_over_float32_candidates_equals_the_product():
    from parlai_poly.modules.stored import fused_dot

    module = BiEncoderModule(FakeEncoder(dim=64)).eval()
    module.score_fused = True
    gen = torch.Generator().manual_seed(7)
    cands, context = torch.randn(3000, 64, generator=gen), torch.randn(4, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(module.score(context, cands), context @ cands.t(), **CLOSE)
    assert any(key[0] == torch.float32 for key in fused_dot._compiled)  # through the compiled pass


def test_rescoring_the_top_keeps_the_order_below_it():
    """The top k become float32's and stay on top; the rest keep the approximate pass's order
    (no ties made among them), so rank and MRR below k are the approximate pass's."""
    from parlai_poly.modules.stored import rescore_top

    gen = torch.Generator().manual_seed(9)
    cands, context = torch.randn(200, 16, generator=gen), torch.randn(3, 16, generator=gen)
    exact = context @ cands.t()
    approx = exact + 0.05 * torch.randn(exact.shape, generator=gen)
    fixed = rescore_top(approx, lambda top: torch.einsum("bd,bkd->bk", context, top), cands, 10)
    top = approx.topk(10, dim=1).indices
    torch.testing.assert_close(fixed.gather(1, top), exact.gather(1, top))
    rest = torch.ones_like(approx, dtype=torch.bool).scatter(1, top, False)
    for row in range(3):
        kept, before = fixed[row][rest[row]], approx[row][rest[row]]
        assert kept.max() < fixed[row].gather(0, top[row]).min()
        assert torch.equal(kept.argsort(descending=True), before.argsort(descending=True))
        assert kept.unique().numel() == kept.numel()


def test_bi_scoring_that_cannot_compile_goes_by_chunks_not_over_the_whole_store(monkeypatch):
    """Without the compiled pass the bi-encoder scores chunk by chunk (temporaries a chunk's
    [B, n]); running dot_scores eagerly over all N would take an [N, B, d] float32 tensor."""
    from parlai_poly.modules import bi_encoder
    from parlai_poly.modules.stored import CompiledOrEager, StoredCandidates

    eager_calls = []

    def dot_scores_spy(*args):
        eager_calls.append(args)
        raise AssertionError("dot_scores over the whole store")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(bi_encoder, "fused_dot", CompiledOrEager(dot_scores_spy))
    module = BiEncoderModule(FakeEncoder(dim=64)).eval()
    module.score_fused = True
    gen = torch.Generator().manual_seed(8)
    cands, context = torch.randn(3000, 64, generator=gen), torch.randn(2, 64, generator=gen)
    stored = StoredCandidates.quantize(cands, "bfloat16")
    with torch.no_grad(), pytest.warns(UserWarning, match="torch.compile of dot_scores_spy failed"):
        scores = module.score(context, stored)
    expected = (context.bfloat16() @ stored.values.t()).float()
    torch.testing.assert_close(scores, expected)
    with torch.no_grad():  # compiling now off: chunks straight away, no second warning
        torch.testing.assert_close(module.score(context, stored), expected)
    assert not eager_calls and not bi_encoder.fused_dot.enabled


@pytest.mark.parametrize("dtype", [None, "float32", "int8"])
def test_no_candidates_give_empty_scores(dtype):
    from parlai_poly.modules.stored import StoredCandidates

    module = BiEncoderModule(FakeEncoder(dim=8)).eval()
    cands = torch.randn(0, 8)
    cands = cands if dtype is None else StoredCandidates.quantize(cands, dtype)
    with torch.no_grad():
        assert module.score(torch.randn(3, 8), cands, chunk_size=4).shape == (3, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_store_chunks_are_its_rows_and_int8_ones_reuse_one_buffer(dtype):
    from parlai_poly.modules.stored import StoredCandidates

    stored = StoredCandidates.quantize(torch.randn(10, 6), dtype)
    seen = []
    for start, values, scales in stored.chunks(4):  # 4 + 4 + 2
        rows, row_scales = stored.rows(start, start + 4)
        assert values.dtype == stored.product_dtype and torch.equal(values, rows)
        assert (scales is None) == (dtype != "int8") and (scales is None or torch.equal(scales, row_scales))
        seen.append((start, len(values), values.data_ptr()))
    assert [(start, n) for start, n, _ in seen] == [(0, 4), (4, 4), (8, 2)]
    assert (len({ptr for _, _, ptr in seen}) == 1) == (dtype == "int8")  # converted into one buffer


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_bi_scores_from_a_compact_store(dtype):
    """The fused pass (up to FUSED_DOT_MAX_CONTEXTS contexts) and the chunked product give the
    store's own numbers' scores; rescoring the top K gives exactly float32's."""
    from parlai_poly.modules.stored import FUSED_DOT_MAX_CONTEXTS, StoredCandidates, rescore_top

    module = BiEncoderModule(FakeEncoder(dim=64)).eval()
    gen = torch.Generator().manual_seed(5)
    cands = torch.randn(3000, 64, generator=gen)
    stored = StoredCandidates.quantize(cands, dtype)
    module.score_fused = True
    with torch.no_grad():
        for bsz in (1, FUSED_DOT_MAX_CONTEXTS, FUSED_DOT_MAX_CONTEXTS + 1):  # fused; fused; chunked
            context = torch.randn(bsz, 64, generator=gen)
            exact = context @ cands.t()
            own = context @ stored.dequantize().t()  # what the stored numbers stand for
            scores = module.score(context, stored)
            if bsz <= FUSED_DOT_MAX_CONTEXTS:  # float32 accumulation of the stored numbers
                torch.testing.assert_close(scores, own, rtol=1e-5, atol=1e-4)
            top_scale = exact.abs().max(-1, keepdim=True).values
            assert ((scores - exact).abs() <= 0.02 * top_scale).all()  # bfloat16 products: ~0.4%
            fixed = rescore_top(scores, lambda top: module.score(context, top), cands, 50)
            top = fixed.topk(50, dim=1)
            torch.testing.assert_close(top.values, exact.gather(1, top.indices), **CLOSE)
            assert torch.equal(top.indices[:, :10], exact.topk(10, dim=1).indices)
        torch.testing.assert_close(module.score(context, stored, chunk_size=7), module.score(context, stored), **CLOSE)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_poly_scores_from_a_compact_store(dtype, attention):
    from parlai_poly.modules.stored import StoredCandidates, rescore_top

    module = wide_poly_module(attention)
    gen = torch.Generator().manual_seed(6)
    cands = torch.randn(4000, 64, generator=gen)
    stored = StoredCandidates.quantize(cands, dtype)
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (2, 12), generator=gen))
        exact = module.score(context, mask, cands)
        for fused in (False, True):
            module.score_fused = fused
            scores = module.score(context, mask, stored, chunk_size=512)
            error = (scores - exact).abs().max(-1).values
            limit = (BF16_TOLERANCE if dtype == "bfloat16" else 2 * BF16_TOLERANCE) * exact.abs().max(-1).values
            assert (error <= limit).all() and (error > 0).any(), error
            fixed = rescore_top(scores, lambda top: module.score(context, mask, top), cands, 20)
            top = fixed.topk(10, dim=1)
            assert torch.equal(top.indices, exact.topk(10, dim=1).indices)
            torch.testing.assert_close(top.values, exact.gather(1, top.indices), **CLOSE)


def count_int8_products(monkeypatch):
    """The int8 products scoring takes, by the shape of their similarities."""
    from parlai_poly.modules import stored

    shapes = []
    original = stored.int8_product

    def counting(rows, context_q):
        assert rows.dtype == context_q.dtype == torch.int8  # the store's own rows, not a copy
        shapes.append(tuple(original(rows, context_q).shape))
        return original(rows, context_q)

    for module in ("bi_encoder", "poly_encoder"):
        monkeypatch.setattr(f"parlai_poly.modules.{module}.int8_product", counting)
    return shapes


def int8_context(vectors):
    """What ``quantize_contexts_int8`` makes of vectors [B, k, d], as float32 numbers."""
    from parlai_poly.modules.stored import quantize_contexts_int8

    q, scales = quantize_contexts_int8(vectors)
    return (q.t().float().view(vectors.shape) * scales.view(-1, 1, 1))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("attention", ["basic", "sqrt"])
def test_poly_multiplies_int8_candidates_as_int8(attention, fused, monkeypatch):
    """On CPU an int8 store's rows are multiplied as stored, with the context vectors rounded
    to int8 per context: the scores are exactly those of both sides' int8 numbers (to float32
    rounding), and off the float32 ones by no more than the int8 rounding allows."""
    from parlai_poly.modules.stored import StoredCandidates

    module = wide_poly_module(attention)
    module.score_fused = fused
    products = count_int8_products(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    cands = torch.randn(3000, 64, generator=gen)
    stored = StoredCandidates.quantize(cands, "int8")
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (2, 12), generator=gen))
        mask[0, 10:] = False  # a shorter first context: masked codes stay out of the softmax
        scores = module.score(context, mask, stored, chunk_size=1024)
        own = module.score(int8_context(context), mask, stored.dequantize())  # float32 over both sides' int8 numbers
        exact = module.score(context, mask, cands)
    assert products == [(1024, 2 * 16), (1024, 2 * 16), (952, 2 * 16)]
    torch.testing.assert_close(scores, own, rtol=1e-5, atol=1e-4)
    limit = 2 * BF16_TOLERANCE * exact.abs().max(-1).values
    assert ((scores - exact).abs().max(-1).values <= limit).all()


def test_bi_multiplies_int8_candidates_as_int8_beyond_the_fused_pass(monkeypatch):
    """More contexts than one fused pass takes (or a chunk size asked for): one int8 product
    per chunk, giving the scores of both sides' int8 numbers."""
    from parlai_poly.modules.stored import FUSED_DOT_MAX_CONTEXTS, StoredCandidates

    module = BiEncoderModule(FakeEncoder(dim=64)).eval()
    products = count_int8_products(monkeypatch)
    gen = torch.Generator().manual_seed(8)
    cands = torch.randn(2000, 64, generator=gen)
    stored = StoredCandidates.quantize(cands, "int8")
    context = torch.randn(FUSED_DOT_MAX_CONTEXTS + 1, 64, generator=gen)
    with torch.no_grad():
        scores = module.score(context, stored, chunk_size=1500)
    own = int8_context(context.unsqueeze(1)).squeeze(1) @ stored.dequantize().t()
    assert products == [(1500, 17), (500, 17)]
    torch.testing.assert_close(scores, own, rtol=1e-5, atol=1e-4)


def test_int8_candidates_fall_back_to_bfloat16_products_where_int8_ones_do_not_run(monkeypatch):
    from parlai_poly.modules import stored as stored_module
    from parlai_poly.modules.stored import StoredCandidates

    monkeypatch.setattr(stored_module, "_int8_matmul_runs", lambda: False)
    products = count_int8_products(monkeypatch)
    module = wide_poly_module("basic")
    gen = torch.Generator().manual_seed(9)
    cands = torch.randn(1000, 64, generator=gen)
    stored = StoredCandidates.quantize(cands, "int8")
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (2, 12), generator=gen))
        scores = module.score(context, mask, stored)
        exact = module.score(context, mask, cands)
    assert products == []
    assert ((scores - exact).abs().max(-1).values <= 2 * BF16_TOLERANCE * exact.abs().max(-1).values).all()


@pytest.fixture(scope="module", params=["bi", "poly"])
def store_rankers(request, tmp_path_factory, tiny_backbone):
    """One untrained model over 150 fixed candidates, its store kept in each dtype."""
    folder = tmp_path_factory.mktemp(f"stores_{request.param}")
    path = folder / "cands.txt"
    path.write_text("".join(f"reply number {i} about {['cats', 'dogs', 'rain', 'tea'][i % 4]}\n" for i in range(150)))
    model_file = str(folder / "model")
    extra = ["--poly-n-codes", "4"] if request.param == "poly" else []
    make_agent("-m", f"parlai_poly.agents:{request.param}", "--hf-model", tiny_backbone, *extra).save(model_file)
    from helpers import reload_agent

    def agent(dtype):
        return reload_agent(
            model_file, eval_candidates="fixed", fixed_candidates_path=str(path), datatype="valid",
            candidate_store_dtype=dtype, candidate_cache_dir=str(folder / dtype), rescore_top_k=30,
        )

    return {dtype: agent(dtype) for dtype in ("float32", "bfloat16", "int8")}


def test_agents_rank_from_compact_stores_like_float32(store_rankers):
    exact_agent = store_rankers["float32"]
    for dtype in ("bfloat16", "int8"):
        agent = store_rankers[dtype]
        assert agent.candidate_store.dtype == dtype and agent.fixed.stored_for(agent.fixed_candidate_encs) is not None
        assert agent.rescore_top_k() == 30
        for text in ("tell me about cats", "and the rain"):
            fifth = ask(exact_agent, text, "reply number 12 about cats")[0]["text_candidates"][4]
            exact_reply, exact_metrics, exact = ask(exact_agent, text, fifth)
            reply, metrics, scores = ask(agent, text, fifth)
            assert reply["text_candidates"][:10] == exact_reply["text_candidates"][:10]
            top = scores.topk(30).indices  # rescored: float32's scores exactly
            torch.testing.assert_close(scores[top], exact[top], **CLOSE)
            assert not torch.equal(scores, exact)  # the rest really came from the compact store
            assert (scores - exact).abs().max() <= 2 * BF16_TOLERANCE * exact.abs().max()
            assert metrics == exact_metrics == {"rank": 5, "mrr": 1 / 5}  # a label among the rescored


def test_rescore_top_k_defaults_to_what_the_ranking_shows(store_rankers, monkeypatch):
    """-1: eval_step's top k (the predictions shown), else --cap-num-predictions; at least 10."""
    agent = store_rankers["int8"]
    monkeypatch.setitem(agent.opt, "rescore_top_k", -1)
    monkeypatch.setattr(agent, "rank_top_k", -1)
    assert agent.rescore_top_k() == agent.opt["cap_num_predictions"] == 100
    monkeypatch.setattr(agent, "rank_top_k", 3)  # the API asks for its top 3
    assert agent.rescore_top_k() == 10
    monkeypatch.setattr(agent, "rank_top_k", 101)  # eval_step: 100 shown + a blocked history line
    assert agent.rescore_top_k() == 101
    # no more candidates than are rescored: float32 throughout, no compact pass at all
    monkeypatch.setitem(agent.opt, "rescore_top_k", 150)
    assert agent.low_precision_copy(agent.fixed_candidate_encs) is None


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["bi", "poly"])
def test_trained_agents_rank_from_compact_stores_like_float32(agent, tmp_path, tiny_backbone, synthetic_task):
    """eval_model over 128 fixed candidates with each store dtype: the same metrics (the top
    20 rescored in float32 hold every label of a trained model)."""
    from parlai.scripts.eval_model import EvalModel
    from parlai.scripts.train_model import TrainModel

    from conftest import COLOURS, FILLERS
    from helpers import train_options

    model_file = str(tmp_path / "model")
    TrainModel.main(**train_options(agent, tiny_backbone, synthetic_task, model_file, num_epochs=2))
    replies = [f"it is {c}" for c in COLOURS[:8]]  # the synthetic task's labels
    others = [f"it is {c} {f}" for c in COLOURS for f in FILLERS][:120]
    cands = tmp_path / "cands.txt"
    cands.write_text("".join(line + "\n" for line in replies + others))
    results = {}
    for dtype in ("float32", "bfloat16", "int8"):
        results[dtype] = EvalModel.main(
            **synthetic_task, model_file=model_file, datatype="valid", batchsize=8, eval_candidates="fixed",
            fixed_candidates_path=str(cands), candidate_store_dtype=dtype, rescore_top_k=20,
            candidate_cache_dir=str(tmp_path / dtype),
        )
    exact = {key: float(value) for key, value in results["float32"].items() if key in METRICS}
    assert exact["R@10/128"] > 0.5  # trained: the labels rank near the top, where rescoring applies
    for dtype in ("bfloat16", "int8"):
        assert {key: float(value) for key, value in results[dtype].items() if key in METRICS} == pytest.approx(exact)
        (store,) = (tmp_path / dtype).glob("*.safetensors")  # each evaluation read a store of its dtype
        with safe_open(str(store), framework="pt") as f:
            assert str(f.get_slice("encs").get_dtype()) == {"bfloat16": "BF16", "int8": "I8"}[dtype]


METRICS = ("hits@1", "hits@5", "hits@10", "R@1/128", "R@10/128", "mrr", "rank")
