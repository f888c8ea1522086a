"""Scoring many candidates: chunked scores equal the whole and the naive formula; top-k
ranking gives what a full sort gives, with rank and MRR from the full scores."""
import math

import pytest
import torch

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


def count_chunks(module, monkeypatch):
    """Count the calls of the module's per-chunk scoring function."""
    calls = []
    name = "_score_multihead" if module.poly_attention.kind == "multihead" else "_score_basic"
    original = getattr(module, name)

    def counting(*args):
        calls.append(args[-1].size(-2))
        return original(*args)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
@pytest.mark.parametrize("poly_type", POLY_TYPES)
def test_chunked_poly_scores_equal_whole_and_naive(attention, poly_type, monkeypatch):
    module = poly_module(attention, poly_type)
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
        module.score_chunk_bytes = 3 * 2 * 5 * 4 * (5 * 2 if attention == "multihead" else 4)  # ~3 per chunk
        chunks = count_chunks(module, monkeypatch)
        scores = module.score(context, mask, cands)
    assert len(chunks) > 1 and sum(chunks) == 23 and max(chunks) <= 3
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
    from parlai_poly.modules.poly_encoder import rescore_top

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


def test_bfloat16_scoring_is_chunked_within_the_budget(monkeypatch):
    module = wide_poly_module("basic")
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (2, 12)))
        cands = torch.randn(1000, 64).bfloat16()
        whole = module.score(context, mask, cands, chunk_size=1000)
        # basic: 4 float32 tensors of [B, m] per candidate, whatever the products' dtype
        module.score_chunk_bytes = 100 * 4 * 2 * 16 * 4  # 100 candidates per chunk
        chunks = count_chunks(module, monkeypatch)
        scores = module.score(context, mask, cands)
    assert len(chunks) == 10 and max(chunks) == 100
    torch.testing.assert_close(scores, whole, **CLOSE)


def test_default_chunks_on_cpu_fit_a_cache_sized_budget(monkeypatch):
    from parlai_poly.modules.bi_encoder import CPU_SCORE_CHUNK_BYTES

    module = wide_poly_module("basic")
    with torch.no_grad():
        context, mask = module.encode_context(torch.randint(1, 100, (1, 12)))
        chunks = count_chunks(module, monkeypatch)
        module.score(context, mask, torch.randn(20000, 64))
    assert max(chunks) == CPU_SCORE_CHUNK_BYTES // (4 * 16 * 4) and sum(chunks) == 20000


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
    assert source() is fast_agent.fixed_candidate_encs and copy.dtype == torch.bfloat16
    ask(fast_agent, "more tea", "reply number 3 about tea")
    assert fast_agent._bf16_cache[1] is copy  # made once, not per batch
    assert not hasattr(exact_agent, "_bf16_cache")


def test_auto_score_dtype_turns_to_bfloat16_only_where_it_pays(poly_rankers, monkeypatch):
    import importlib

    poly = importlib.import_module("parlai_poly.agents.poly")  # the package names its class `poly`
    agent = poly_rankers[0]
    monkeypatch.setitem(agent.opt, "score_dtype", "auto")
    monkeypatch.setattr(poly, "native_bfloat16", lambda: True)
    cands = agent.fixed_candidate_encs  # 150: under BF16_AUTO_MIN_CANDIDATES, float32 exactly
    assert agent._score_dtype(len(cands)) == torch.float32 and agent._bfloat16_copy(cands) is None
    monkeypatch.setattr(poly, "BF16_AUTO_MIN_CANDIDATES", 100)
    assert agent._bfloat16_copy(cands).dtype == torch.bfloat16
    monkeypatch.setattr(poly, "native_bfloat16", lambda: False)  # emulated bfloat16: slower
    assert agent._score_dtype(len(cands)) == torch.float32
    monkeypatch.setitem(agent.opt, "score_dtype", "bfloat16")  # asked for: at any N over the rescored
    assert agent._score_dtype(len(cands)) == torch.bfloat16
