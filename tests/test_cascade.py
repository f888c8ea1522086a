"""Retrieve and rerank: bi top-K -> poly -> cross, over fixed candidates."""
import os

import pytest
from parlai.scripts.eval_model import EvalModel
from parlai.scripts.train_model import TrainModel

from helpers import make_agent, reload_agent, train_options

COLOURS = "red blue green yellow orange purple pink brown".split()
CONTEXTS = [f"today the {a} please" for a in "cat dog horse cow sheep goat pig duck".split()]


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    path = tmp_path_factory.mktemp("cands") / "replies.txt"
    path.write_text("".join(f"it is {c}\n" for c in COLOURS))
    return str(path)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_backbone):
    """Model files of randomly initialised bi, poly and cross: their orders all differ."""
    folder = tmp_path_factory.mktemp("untrained")
    files = {}
    # a max-pooled bi-encoder: a fresh poly-encoder scores much like a mean-pooled one
    for kind, extra in (("bi", ["--reduction-type", "max"]), ("poly", ["--poly-n-codes", "4"]), ("cross", [])):
        files[kind] = str(folder / kind)
        make_agent("-m", f"parlai_poly.agents:{kind}", "--hf-model", tiny_backbone, *extra).save(files[kind])
    return files


def top_choices(model_file, candidates, **overrides):
    agent = reload_agent(model_file, eval_candidates="fixed", fixed_candidates_path=candidates, **overrides)
    firsts, orders = [], []
    for text in CONTEXTS:
        agent.reset()
        agent.observe({"text": text, "episode_done": True})
        ranked = agent.act()["text_candidates"]
        firsts.append(ranked[0])
        orders.append(ranked)
    return firsts, orders


@pytest.mark.slow
def test_retrieving_one_candidate_keeps_the_bi_encoders_choice(untrained, candidates):
    bi_first, _ = top_choices(untrained["bi"], candidates)
    poly_first, _ = top_choices(untrained["poly"], candidates)
    assert poly_first != bi_first  # so the test can tell which model chose
    cascade_first, _ = top_choices(untrained["poly"], candidates, retrieve_model_file=untrained["bi"], retrieve_top_k=1)
    assert cascade_first == bi_first


def test_retrieving_everything_gives_the_poly_encoders_order(untrained, candidates):
    _, poly_orders = top_choices(untrained["poly"], candidates)
    _, cascade_orders = top_choices(untrained["poly"], candidates, retrieve_model_file=untrained["bi"], retrieve_top_k=8)
    assert cascade_orders == poly_orders


@pytest.mark.slow
def test_reranking_reorders_only_the_top_with_the_cross_encoder(untrained, candidates):
    _, poly_orders = top_choices(untrained["poly"], candidates)
    _, cross_orders = top_choices(untrained["cross"], candidates)
    _, cascade_orders = top_choices(
        untrained["poly"], candidates, retrieve_model_file=untrained["bi"], retrieve_top_k=8,
        rerank_model_file=untrained["cross"], rerank_top_k=3,
    )
    # so the test can tell which model ordered the top 3
    assert any([c for c in cross if c in p[:3]] != p[:3] for p, cross in zip(poly_orders, cross_orders))
    for poly, cross, cascade in zip(poly_orders, cross_orders, cascade_orders):
        assert set(cascade[:3]) == set(poly[:3]) and cascade[3:] == poly[3:]
        assert cascade[:3] == [c for c in cross if c in poly[:3]]  # the cross-encoder's order


def test_a_cross_encoder_orders_what_the_retriever_picks(untrained, candidates):
    """--retrieve-model-file on the cross agent: the bi-encoder's top 3 first, in the
    cross-encoder's own order; the rest in the bi-encoder's order."""
    _, bi_orders = top_choices(untrained["bi"], candidates)
    _, cross_orders = top_choices(untrained["cross"], candidates)
    _, cascade_orders = top_choices(untrained["cross"], candidates, retrieve_model_file=untrained["bi"], retrieve_top_k=3)
    assert any(cross[:3] != bi[:3] for bi, cross in zip(bi_orders, cross_orders))  # two orders to tell apart
    for bi, cross, cascade in zip(bi_orders, cross_orders, cascade_orders):
        assert cascade[:3] == [c for c in cross if c in bi[:3]] and cascade[3:] == bi[3:]


@pytest.mark.slow
def test_trained_cascade_ranks_well_in_eval_model(tmp_path, tiny_backbone, synthetic_task, candidates):
    files = {}
    for kind, epochs in (("bi", 2), ("poly", 2), ("cross", 5)):
        files[kind] = str(tmp_path / kind)
        TrainModel.main(**train_options(kind, tiny_backbone, synthetic_task, files[kind], num_epochs=epochs))
    report = EvalModel.main(
        **synthetic_task, model_file=files["poly"], datatype="valid", batchsize=16, eval_candidates="fixed",
        fixed_candidates_path=candidates, retrieve_model_file=files["bi"], retrieve_top_k=4,
        rerank_model_file=files["cross"], rerank_top_k=2,
    )
    assert float(report["R@1/8"]) >= 0.6


def test_retriever_must_be_a_bi_encoder(untrained, candidates):
    from parlai_poly.errors import ParlaiPolyError

    with pytest.raises(ParlaiPolyError, match="--retrieve-model-file .*not a parlai-poly bi model file"):
        top_choices(untrained["poly"], candidates, retrieve_model_file=untrained["cross"])


# ---- hard negatives for training a cross-encoder -------------------------------------------
def hard_negative_candidates(untrained, candidates, text, label, **overrides):
    """What the cross agent trains one (text, label) example against with --hard-negatives."""
    agent = reload_agent(
        untrained["cross"], retrieve_model_file=untrained["bi"], fixed_candidates_path=candidates,
        hard_negatives=3, **overrides,
    )
    obs = agent.observe({"text": text, "labels": [label], "episode_done": True})
    return agent._build_candidates(agent.batchify([obs]), source="batch", mode="train")


def test_hard_negatives_are_the_retrievers_best_other_than_the_label(untrained, candidates):
    """A pool of all 8 candidates: the negatives are the bi-encoder's top 3 without the label,
    in its order, after the label at index 0; their token ids are the candidates' own."""
    _, bi_orders = top_choices(untrained["bi"], candidates)
    for text, order in zip(CONTEXTS[:3], bi_orders):
        label = order[1]  # the label is not the bi-encoder's first choice: that one is a negative
        cands, vecs, label_inds = hard_negative_candidates(untrained, candidates, text, label, hard_negatives_pool=8)
        assert cands[0] == [label] + [c for c in order if c != label][:3]
        assert label_inds.tolist() == [0] and vecs.shape[:2] == (1, 4)
        agent = reload_agent(untrained["cross"], fixed_candidates_path=candidates, eval_candidates="fixed")
        for row, cand in zip(vecs[0, 1:], cands[0][1:]):
            expected = agent.fixed_candidate_vecs[agent.fixed_candidates.index(cand)]
            assert row[: expected.size(0)].tolist() == expected.tolist()


def test_hard_negatives_come_from_the_random_pool_only(untrained, candidates):
    """Pools of 4 of the 8: each negative is the bi-encoder's choice within some draw, never the
    label, and over many draws more than the 3 globally hardest show up."""
    import torch

    torch.manual_seed(0)
    label = "it is red"
    seen = set()
    for _ in range(20):
        cands, _, _ = hard_negative_candidates(untrained, candidates, CONTEXTS[0], label, hard_negatives_pool=4)
        assert label not in cands[0][1:] and len(set(cands[0][1:])) == 3
        seen.update(cands[0][1:])
    assert len(seen) > 3


@pytest.mark.parametrize(
    "options, problem",
    [
        (dict(hard_negatives=3), "needs --retrieve-model-file"),
        (dict(hard_negatives=8, hard_negatives_pool=8, retrieve_model_file="x"), "choose fewer than the pool holds"),
        (dict(hard_negatives=-1), "at least 0"),
    ],
)
def test_hard_negative_options_are_checked(untrained, options, problem):
    from parlai_poly.agents.cross import check_hard_negative_options
    from parlai_poly.errors import ParlaiPolyError

    with pytest.raises(ParlaiPolyError, match=problem):
        check_hard_negative_options({"hard_negatives_pool": 63, **options})


@pytest.mark.slow
def test_a_cross_encoder_learns_from_hard_negatives(tmp_path, tiny_backbone, synthetic_task, candidates):
    """Trained against the 3 of 7 random candidates a trained bi-encoder finds hardest, a
    cross-encoder ranks the task's 8 inline candidates far above chance."""
    bi = str(tmp_path / "bi")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, bi, num_epochs=2))
    cross = str(tmp_path / "cross")
    TrainModel.main(**train_options(
        "cross", tiny_backbone, synthetic_task, cross, num_epochs=10, candidates="batch",
        retrieve_model_file=bi, fixed_candidates_path=candidates, hard_negatives=3, hard_negatives_pool=7,
    ))
    valid = EvalModel.main(**synthetic_task, model_file=cross, datatype="valid", batchsize=16)
    assert float(valid["R@1/8"]) >= 0.6


# ---- HNSW retrieval (faiss) ----------------------------------------------------------------
ANIMALS = "cat dog horse cow sheep goat pig duck goose hen".split()


@pytest.fixture
def private_bi(untrained, tmp_path):
    """A copy of the bi-encoder and 300 candidates in a folder of its own (its caches go there)."""
    import shutil

    for suffix in ("", ".opt", ".dict"):
        shutil.copy(untrained["bi"] + suffix, str(tmp_path / "bi") + suffix)
    cands = tmp_path / "many.txt"
    lines = [f"the {a} is {c} number {i}\n" for i in range(15) for a in ANIMALS[:4] for c in COLOURS[:5]]
    cands.write_text("".join(lines))
    return str(tmp_path / "bi"), str(cands)


def cascade_agent(untrained, bi_file, candidates, **overrides):
    """The poly-encoder over the candidates with the given retrieval, after one act."""
    agent = reload_agent(
        untrained["poly"], eval_candidates="fixed", fixed_candidates_path=candidates,
        retrieve_model_file=bi_file, **overrides,
    )
    agent.observe({"text": CONTEXTS[0], "episode_done": True})
    agent.act()
    return agent


@pytest.mark.slow
def test_hnsw_retrieval_gives_the_exact_cascades_top_k(untrained, private_bi):
    pytest.importorskip("faiss")
    bi_file, candidates = private_bi
    k = 20
    _, exact = top_choices(untrained["poly"], candidates, retrieve_model_file=bi_file, retrieve_top_k=k)
    _, hnsw = top_choices(
        untrained["poly"], candidates, retrieve_model_file=bi_file, retrieve_top_k=k,
        retrieve_index="hnsw", hnsw_ef_search=400, hnsw_ef_construction=200,
    )
    assert [order[:k] for order in hnsw] == [order[:k] for order in exact]


@pytest.mark.slow
def test_hnsw_index_is_reused_and_rebuilt_with_the_candidates_or_weights(untrained, private_bi):
    import torch

    pytest.importorskip("faiss")
    bi_file, candidates = private_bi
    options = dict(retrieve_index="hnsw", hnsw_m=8, retrieve_top_k=5)
    first = cascade_agent(untrained, bi_file, candidates, **options)._cascade
    assert first.index_store.status == "built" and first.index.ntotal == 300
    assert cascade_agent(untrained, bi_file, candidates, **options)._cascade.index_store.status == "reused"
    # the index is over the float32 encodings: another store dtype converts the store, not the index
    compact = cascade_agent(untrained, bi_file, candidates, candidate_store_dtype="int8", **options)._cascade
    assert compact.index_store.status == "reused" and compact.retriever.candidate_store.status == "converted"
    assert compact.retriever.candidate_store.dtype == "int8" and compact.retriever.rescore_top_k() == 5

    with open(candidates, "a") as f:  # other candidates
        f.write("the owl is gold number 99\n")
    cascade = cascade_agent(untrained, bi_file, candidates, **options)._cascade
    assert cascade.index_store.status == "built" and cascade.index.ntotal == 301

    bi = reload_agent(bi_file)  # other retriever weights, saved in the same model file
    with torch.no_grad():
        bi.model.context_encoder.backbone.encoder.layer[0].output.dense.weight.mul_(1.5)
    bi.save(bi_file)
    cascade = cascade_agent(untrained, bi_file, candidates, **options)._cascade
    assert cascade.index_store.status == "built"
    assert cascade_agent(untrained, bi_file, candidates, **options)._cascade.index_store.status == "reused"
    folder = os.path.dirname(bi_file)
    assert len([name for name in os.listdir(folder) if name.endswith(".faiss")]) == 1
