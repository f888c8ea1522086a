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
