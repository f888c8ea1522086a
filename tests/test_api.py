"""The Python API: Ranker.load / rank / rank_batch / encode, the same scores as the agents."""
import pytest
import torch
from parlai.scripts.train_model import TrainModel

from helpers import AGENTS, rank, reload_agent, train_options
from parlai_poly import Ranker

COLOURS = [f"it is {c}" for c in "red blue green yellow orange purple pink brown".split()]


@pytest.fixture(scope="module", params=AGENTS)
def trained(request, tmp_path_factory, tiny_backbone, synthetic_task):
    agent = request.param
    model_file = str(tmp_path_factory.mktemp(agent) / "model")
    TrainModel.main(**train_options(agent, tiny_backbone, synthetic_task, model_file, num_epochs=5 if agent == "cross" else 2))
    return agent, model_file


@pytest.mark.slow
def test_rank_gives_the_agents_own_order_and_scores(trained):
    agent, model_file = trained
    ranker = Ranker.load(model_file)
    assert ranker.kind == agent
    ranked = ranker.rank("today the cat please", COLOURS)
    texts, scores = rank(reload_agent(model_file, return_cand_scores=True), "today the cat please", COLOURS)
    assert [t for t, _ in ranked] == texts
    assert [s for _, s in ranked] == pytest.approx(scores.tolist(), abs=1e-5)
    assert ranked[0][0] == "it is red"  # the cat's colour in the synthetic task
    assert len(ranker.rank("today the cat please", COLOURS, top_k=3)) == 3


@pytest.mark.slow
def test_rank_batch_matches_one_at_a_time(trained):
    _, model_file = trained
    ranker = Ranker.load(model_file)
    contexts = [f"now the {animal} again" for animal in ("cat", "dog", "horse")] * 15
    candidates = [COLOURS[i % 8 :] + COLOURS[: i % 8] for i in range(len(contexts))]
    batched = ranker.rank_batch(contexts, candidates, top_k=2, batch_size=16)
    for context, cands, result in zip(contexts[:5], candidates[:5], batched[:5]):
        alone = ranker.rank(context, cands, top_k=2)
        assert [t for t, _ in result] == [t for t, _ in alone]
        assert [s for _, s in result] == pytest.approx([s for _, s in alone], abs=1e-4)


@pytest.mark.slow
def test_encode_and_a_second_ranking_reuse_candidate_encodings(trained):
    agent, model_file = trained
    ranker = Ranker.load(model_file)
    if agent == "cross":
        with pytest.raises(ValueError, match="no candidate encodings"):
            ranker.encode(COLOURS)
        return
    encs = ranker.encode(COLOURS)
    assert encs.shape == (8, ranker.agent.model.context_encoder.dim) and encs.dtype == torch.float32
    ranker.rank("today the dog", COLOURS)
    encoded = ranker.agent._encoding_memo.encoded
    ranker.rank("today the horse", list(reversed(COLOURS)))
    assert ranker.agent._encoding_memo.encoded == encoded  # nothing encoded again


@pytest.mark.slow
def test_readme_example_runs(trained, tmp_path):
    """The README's Python example, as written there, on a model file of ours."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"```python\n(from parlai_poly import Ranker.*?)```", readme.read_text(), re.S).group(1)
    _, model_file = trained
    code = code.replace("zoo:parlai_poly/ccc_poly16/model", model_file).replace('datapath="data"', f'datapath="{tmp_path}"')
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["best"][0][0] and isinstance(namespace["best"][0][1], float)


@pytest.mark.slow
def test_fixed_candidates_rank_as_the_same_list_given_inline(trained, tmp_path):
    agent, model_file = trained
    path = tmp_path / "responses.txt"
    path.write_text("".join(c + "\n" for c in COLOURS))
    ranker = Ranker.load(model_file, fixed_candidates=str(path))
    assert ranker.fixed_candidates == COLOURS
    fixed = ranker.rank("today the cat please", top_k=3)
    inline = ranker.rank("today the cat please", COLOURS, top_k=3)  # the same ranker, both ways
    assert [t for t, _ in fixed] == [t for t, _ in inline]
    assert [s for _, s in fixed] == pytest.approx([s for _, s in inline], abs=1e-4)
    assert fixed[0][0] == "it is red"
    batched = ranker.rank_batch(["now the dog", "today the cat please"], top_k=2)
    assert [t for t, _ in batched[1]] == [t for t, _ in fixed[:2]]
    assert [s for _, s in batched[1]] == pytest.approx([s for _, s in fixed[:2]], abs=1e-4)


@pytest.mark.slow
def test_ranking_without_candidates_needs_fixed_ones(trained):
    _, model_file = trained
    with pytest.raises(ValueError, match="fixed_candidates=FILE"):
        Ranker.load(model_file).rank("today the cat please")
