"""Each agent, trained in-process on the synthetic task with a tiny random BERT."""
import json
import math
import os

import pytest
import torch
from parlai.scripts.eval_model import EvalModel
from parlai.scripts.train_model import TrainModel

from helpers import AGENTS, CHANCE, model_options, rank, reload_agent, train_options
from parlai_poly.errors import ModelFileError, ParlaiPolyError

COLOUR_CANDIDATES = [f"it is {c}" for c in "red blue green yellow orange purple pink brown".split()]


@pytest.fixture(scope="module", params=AGENTS)
def trained(request, tmp_path_factory, tiny_backbone, synthetic_task):
    agent = request.param
    model_file = str(tmp_path_factory.mktemp(agent) / "model")
    # from scratch, the cross-encoder needs more updates to learn the pairings (~150)
    epochs = 5 if agent == "cross" else 2
    valid, _ = TrainModel.main(**train_options(agent, tiny_backbone, synthetic_task, model_file, num_epochs=epochs))
    return agent, model_file, valid


@pytest.mark.slow
def test_training_learns_the_task(trained, tiny_backbone, synthetic_task):
    agent, model_file, valid = trained
    untrained = EvalModel.main(**model_options(agent, tiny_backbone, synthetic_task), datatype="valid")
    assert float(valid["R@1/8"]) >= 0.6 > CHANCE
    assert float(valid["loss"]) < float(untrained["loss"])
    assert float(valid["loss"]) < math.log(8)  # better than a uniform guess


@pytest.mark.slow
def test_save_and_reload_give_identical_scores(trained, tmp_path):
    agent, model_file, _ = trained
    first = reload_agent(model_file, return_cand_scores=True)
    ranked, scores = rank(first, "today the cat please", COLOUR_CANDIDATES)
    copy = str(tmp_path / "copy")
    first.save(copy)
    second = reload_agent(copy, return_cand_scores=True)
    ranked_again, scores_again = rank(second, "today the cat please", COLOUR_CANDIDATES)
    assert ranked == ranked_again
    assert torch.equal(scores, scores_again)
    assert ranked[0] == "it is red"  # the cat's colour in the synthetic task
    # the architecture travels as data in the options, and builds the same model again
    from parlai_poly.modules import ModelConfig, build_module

    saved = json.load(open(copy + ".opt"))["architecture"]
    assert saved["kind"] == agent
    rebuilt = build_module(ModelConfig.from_dict(saved), second.unwrapped_model.context_encoder
                           if agent != "cross" else second.unwrapped_model.encoder)
    assert rebuilt.state_dict().keys() == second.unwrapped_model.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "batch", "fixed", "vocab"])
def test_every_eval_candidate_mode_runs(trained, mode, tmp_path, synthetic_task):
    agent, model_file, _ = trained
    fixed = tmp_path / "colours.txt"
    fixed.write_text("\n".join(COLOUR_CANDIDATES) + "\n")
    options = dict(synthetic_task, model_file=model_file, datatype="valid", batchsize=16)
    options.update(eval_candidates=mode, fixed_candidates_path=str(fixed))
    if agent == "cross" and mode == "vocab":
        with pytest.raises(ParlaiPolyError, match="vocab candidates"):
            EvalModel.main(**options)
        return
    report = EvalModel.main(**options)
    assert int(report["exs"]) == 40
    if mode == "inline":
        assert float(report["R@1/8"]) >= 0.6
    elif mode == "fixed":
        assert float(report["R@1/8"]) >= 0.6  # the fixed file holds the same 8 replies
        written = os.listdir(os.path.dirname(model_file))
        assert not [f for f in written if f.endswith((".vecs", ".encs"))]  # no pickles
    elif mode == "batch":
        assert "R@1/16" in report  # batches of 16: the other labels are the negatives


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "batch"])
def test_every_train_candidate_mode_runs(trained, mode, tmp_path, tiny_backbone, synthetic_task):
    agent, model_file, _ = trained
    out = str(tmp_path / "model")
    valid, _ = TrainModel.main(**train_options(agent, tiny_backbone, synthetic_task, out, candidates=mode, num_epochs=0.1))
    assert int(valid["exs"]) == 40
    assert os.path.isfile(out)


@pytest.mark.slow
def test_init_model_fine_tunes_from_a_saved_model(trained, tmp_path, tiny_backbone, synthetic_task):
    agent, model_file, _ = trained
    out = str(tmp_path / "finetuned")
    # a few updates at a tiny learning rate: the result is the saved model, not a fresh one
    valid, _ = TrainModel.main(
        **train_options(agent, tiny_backbone, synthetic_task, out, init_model=model_file, num_epochs=0.05, learningrate=1e-6)
    )
    assert float(valid["R@1/8"]) >= 0.6


@pytest.mark.slow
def test_init_model_of_another_agent_type_is_refused(trained, tmp_path, tiny_backbone, synthetic_task):
    agent, model_file, _ = trained
    other = "bi" if agent != "bi" else "poly"
    with pytest.raises(ModelFileError, match=f"written by the '{agent}' agent"):
        TrainModel.main(**train_options(other, tiny_backbone, synthetic_task, str(tmp_path / "m"), init_model=model_file, num_epochs=0.05))


def test_cross_scores_do_not_depend_on_pass_size(tiny_backbone):
    """Pairs are sorted by length and cut into passes; the scores must not notice."""
    from helpers import make_agent

    agent = make_agent("-m", "parlai_poly.agents:cross", "--hf-model", tiny_backbone, "--return-cand-scores", "true")
    cands = COLOUR_CANDIDATES + ["it is a much longer reply about many different colours"]
    agent.opt["cross_pairs_per_pass"] = 256
    ranked, scores = rank(agent, "today the cat please", cands)
    agent.opt["cross_pairs_per_pass"] = 2
    ranked_small, scores_small = rank(agent, "today the cat please", cands)
    assert ranked == ranked_small
    torch.testing.assert_close(scores, scores_small, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["bi", "poly"])
def test_cosine_similarity_learns_and_reloads(agent, tmp_path, tiny_backbone, synthetic_task):
    """--similarity cosine: the dual encoders learn with scaled cosines, and a reloaded model
    scores with them (each score at most the scale)."""
    model_file = str(tmp_path / "model")
    options = train_options(agent, tiny_backbone, synthetic_task, model_file, num_epochs=2, similarity="cosine", similarity_scale=10.0)
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6 > CHANCE
    reloaded = reload_agent(model_file, return_cand_scores=True)
    assert (reloaded.opt["similarity"], reloaded.opt["similarity_scale"]) == ("cosine", 10.0)
    ranked, scores = rank(reloaded, "today the cat please", COLOUR_CANDIDATES)
    assert ranked[0] == "it is red" and scores.abs().max() <= 10.0 + 1e-4


@pytest.mark.slow
def test_cross_segment_cosine_head_learns_and_reloads(tmp_path, tiny_backbone, synthetic_task):
    model_file = str(tmp_path / "model")
    options = train_options("cross", tiny_backbone, synthetic_task, model_file, num_epochs=5, cross_head="segment-cosine")
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6 > CHANCE
    agent = reload_agent(model_file, return_cand_scores=True)
    assert agent.opt["cross_head"] == "segment-cosine"
    assert rank(agent, "today the cat please", COLOUR_CANDIDATES)[0][0] == "it is red"


@pytest.mark.slow
def test_cross_starts_from_a_bi_encoder_and_learns_across_the_pair(tmp_path, tiny_backbone, synthetic_task):
    """--init-model of a bi-encoder file: the cross-encoder takes its context encoder (and
    its backbone options, not its head's), starts as that bi-encoder with the attention across
    the pair all but closed, learns, and reloads with its learned bias."""
    from safetensors.torch import load_file

    from parlai_poly.modules.cross_encoder import SEGMENT_BIAS_UNIT

    bi_file, cross_file = str(tmp_path / "bi"), str(tmp_path / "cross")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, bi_file, num_epochs=0.5))
    options = train_options(
        "cross", tiny_backbone, synthetic_task, cross_file, init_model=bi_file, num_epochs=2,
        cross_head="segment-cosine", cross_segment_attention_bias=-8.0,
    )
    bi_weights = {k[len("context_"):]: v for k, v in load_file(bi_file).items() if k.startswith("context_encoder.")}
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6 > CHANCE
    trained = load_file(cross_file)
    changed = [k for k, v in bi_weights.items() if k in trained and not torch.equal(v, trained[k])]
    assert changed  # it went on from the bi-encoder's weights (same names, values moved)
    assert not torch.equal(trained["segment_bias"] * SEGMENT_BIAS_UNIT, torch.full_like(trained["segment_bias"], -8.0))
    agent = reload_agent(cross_file, return_cand_scores=True)
    assert agent.opt["cross_segment_attention_bias"] == -8.0
    assert rank(agent, "today the cat please", COLOUR_CANDIDATES)[0][0] == "it is red"


@pytest.mark.slow
@pytest.mark.parametrize(
    "opening, learned",
    [
        ({"cross_head": "segment-cosine", "cross_segment_gate": 0.0}, "segment_gate"),
        ({"cross_head": "reader"}, "reader_head"),
        ({"cross_head": "residual"}, "residual_head"),
    ],
    ids=["gate", "reader", "residual"],
)
def test_cross_reading_across_from_zero_learns_from_a_bi_encoder_and_reloads(opening, learned, tmp_path, tiny_backbone, synthetic_task):
    """--cross-segment-gate 0, or the reader's or the residual's head at 0, from a bi-encoder
    file: it learns, what reads across moves from 0, and the model file reloads with it and its
    options (the residual head's from a bi-encoder it can keep as its prior: below)."""
    from safetensors.torch import load_file

    bi_file, cross_file = str(tmp_path / "bi"), str(tmp_path / "cross")
    bi_options = {"similarity": "cosine", "reduction_type": "mean"} if learned == "residual_head" else {}
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, bi_file, num_epochs=0.5, **bi_options))
    options = train_options("cross", tiny_backbone, synthetic_task, cross_file, init_model=bi_file, num_epochs=2, **opening)
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6 > CHANCE
    weights = load_file(cross_file)[learned]
    assert weights.abs().min() > 0
    agent = reload_agent(cross_file, return_cand_scores=True)
    assert all(agent.opt[k] == v for k, v in opening.items())
    torch.testing.assert_close(getattr(agent.unwrapped_model, learned).detach(), weights)
    assert rank(agent, "today the cat please", COLOUR_CANDIDATES)[0][0] == "it is red"


@pytest.mark.slow
def test_residual_cross_keeps_its_bi_encoder_and_refuses_one_it_cannot_keep(tmp_path, tiny_backbone, synthetic_task):
    """--cross-head residual from a cosine, mean-pooled bi-encoder file: its prior is that
    bi-encoder's context encoder and scale, untouched by training; from a dot-product one, an
    error names the file and what the head needs."""
    from safetensors.torch import load_file

    bi_file, dot_file, cross_file = (str(tmp_path / name) for name in ("bi", "dot", "cross"))
    bi = train_options("bi", tiny_backbone, synthetic_task, bi_file, num_epochs=0.5, similarity="cosine", reduction_type="mean", similarity_scale=15.0)
    TrainModel.main(**bi)
    TrainModel.main(**train_options("cross", tiny_backbone, synthetic_task, cross_file, init_model=bi_file, num_epochs=1, cross_head="residual"))
    bi_weights, trained = load_file(bi_file), load_file(cross_file)
    prior = {k: v for k, v in trained.items() if k.startswith("prior_encoder.")}
    assert prior and all(torch.equal(v, bi_weights["context_" + k[len("prior_"):]]) for k, v in prior.items())
    assert float(trained["prior_scale"]) == 15.0
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, dot_file, num_epochs=0.5))
    with pytest.raises(ModelFileError, match=f"{dot_file}.*--similarity cosine"):
        TrainModel.main(**train_options("cross", tiny_backbone, synthetic_task, str(tmp_path / "c2"), init_model=dot_file, cross_head="residual"))


@pytest.mark.slow
def test_cross_init_from_a_bi_encoder_starts_where_the_bi_encoder_is(tmp_path, tiny_backbone, synthetic_task):
    """With the attention across the pair closed, the cross-encoder made from a bi-encoder
    file scores each candidate by the cosine of that bi-encoder's own two vectors (x 20)."""
    from helpers import make_agent
    from parlai.utils.torch import padded_tensor

    bi_file = str(tmp_path / "bi")
    TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, bi_file, num_epochs=0.5))
    bi = reload_agent(bi_file)
    cross = make_agent(
        "-m", "parlai_poly.agents:cross", "--init-model", bi_file, "--cross-head", "segment-cosine",
        "--cross-segment-attention-bias", "-10000", "--return-cand-scores", "true",
    )
    assert cross.opt["hf_model"] == tiny_backbone  # the backbone comes with the bi file
    assert cross.opt["reduction_type"] == "first"  # the bi's own head options do not
    with pytest.raises(ParlaiPolyError, match="--cross-head segment-cosine"):
        make_agent("-m", "parlai_poly.agents:cross", "--hf-model", tiny_backbone, "--cross-segment-attention-bias", "-8")
    for text in ("today the cat please", "so the dog now"):
        ranked, scores = rank(cross, text, COLOUR_CANDIDATES)
        vecs = bi.vectorize_fixed_candidates([text] + ranked)  # [CLS] ... [SEP] each
        with torch.no_grad():
            context = bi.model.encode_context(vecs[0].unsqueeze(0))  # [1, d]
            cands = bi.model.encode_candidates(padded_tensor(vecs[1:], bi.NULL_IDX)[0])  # [8, d]
        expected = 20.0 * torch.cosine_similarity(context, cands, dim=-1)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_distinct_rows_keeps_first_copies_in_order():
    from parlai_poly.agents.base import distinct_rows

    vecs = torch.tensor([[5, 1], [7, 0], [5, 1], [2, 2], [7, 0]])
    keep, inverse = distinct_rows(vecs)
    assert keep.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(vecs[keep][inverse], vecs)
    keep, inverse = distinct_rows(torch.tensor([[3], [1], [2]]))  # all distinct: as they were
    assert keep.tolist() == inverse.tolist() == [0, 1, 2]


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("distinct", [True, False])
def test_a_copy_of_the_label_is_no_batch_negative(agent, distinct, tiny_backbone, synthetic_task):
    """Two examples of a batch share a label: with --distinct-batch-candidates it is one
    candidate that both point to; without, each is the other's negative (ParlAI's batch)."""
    from helpers import make_agent

    model = make_agent(
        "-m", f"parlai_poly.agents:{agent}", "--hf-model", tiny_backbone, "--candidates", "batch",
        "--distinct-batch-candidates", str(distinct), "--warmup-updates", "-1", *(["--poly-n-codes", "4"] if agent == "poly" else []),
    )
    labels = ["it is red", "it is blue", "it is red", "it is green"]
    observations = []
    for i, label in enumerate(labels):
        model.reset()
        observations.append(model.observe({"text": f"context {i}", "labels": [label], "episode_done": True}))
    model.reset()
    replies = model.batch_act(observations)
    cands, _, label_inds = model._last_candidates
    if distinct:
        assert cands == ["it is red", "it is blue", "it is green"] and label_inds.tolist() == [0, 1, 0, 2]
    else:
        assert cands == labels and label_inds.tolist() == [0, 1, 2, 3]
    assert [float(r["metrics"]["negatives"]) for r in replies] == [len(cands) - 1] * 4
    assert all(math.isfinite(float(r["metrics"]["mean_loss"])) for r in replies)


def test_cross_training_in_length_groups_gives_one_pass_scores_and_gradients(tiny_backbone):
    """--length-groups in training: the pairs go through in that many passes of similar
    length (less padding), with the same scores and gradients as one padded pass."""
    from helpers import make_agent

    agent = make_agent(
        "-m", "parlai_poly.agents:cross", "--hf-model", tiny_backbone, "--cross-head", "segment-cosine",
        "--cross-segment-attention-bias", "-8", "--length-groups", "3",
    )
    model = agent.unwrapped_model
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same numbers in both runs
    contexts = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 5, 3, 0, 0, 0, 0]])
    cands = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0], [2, 15, 16, 3, 0]])
    context_index, cand_index = torch.arange(2).repeat_interleave(3), torch.arange(3).repeat(2)
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape))

    def scores_and_gradients(groups):
        agent.opt["length_groups"] = groups
        model.zero_grad()
        scores = agent.score_pairs(contexts, cands, context_index, cand_index)
        scores.sum().backward()
        gradients = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return scores.detach(), gradients

    one_pass, one_pass_gradients = scores_and_gradients(1)
    assert len(passes) == 1
    grouped, grouped_gradients = scores_and_gradients(3)
    assert len(passes) == 4 and passes[1][1] > passes[3][1]  # longest pairs first, each pass padded less
    torch.testing.assert_close(grouped, one_pass, rtol=1e-5, atol=1e-5)
    for grouped_gradient, one_pass_gradient in zip(grouped_gradients, one_pass_gradients):
        torch.testing.assert_close(grouped_gradient, one_pass_gradient, rtol=1e-4, atol=1e-5)
