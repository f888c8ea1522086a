"""Training fast: --precision bf16 ranks as float32 does and trains float32 weights (what
this hardware cannot run is refused by name); length-sorted batches keep batch negatives, and
so do random ones encoded in length groups."""
import copy

import pytest
import torch
from parlai.scripts.train_model import TrainModel

from helpers import rank, reload_agent, train_options
from parlai_poly import precision
from parlai_poly.errors import ParlaiPolyError
from parlai_poly.modules import TextEncoder

CONTEXTS = [f"{filler} the {animal} {filler}" for animal in ("cat", "dog", "horse", "cow") for filler in ("today", "now")]
COLOURS = [f"it is {c}" for c in "red blue green yellow orange purple pink brown".split()]
# bfloat16 keeps 8 significant bits: a score may move by about 1% of the largest one
SCORE_TOLERANCE = 0.03


@pytest.fixture(scope="module", params=["bi", "poly", "cross"])
def trained_bf16(request, tmp_path_factory, tiny_backbone, synthetic_task):
    agent = request.param
    model_file = str(tmp_path_factory.mktemp(agent) / "model")
    epochs = 5 if agent == "cross" else 2
    TrainModel.main(**train_options(agent, tiny_backbone, synthetic_task, model_file, num_epochs=epochs, precision="bf16"))
    return agent, model_file


@pytest.mark.slow
def test_bf16_ranks_as_fp32_within_tolerance(trained_bf16):
    agent, model_file = trained_bf16
    fp32 = reload_agent(model_file, precision="fp32", return_cand_scores=True)
    bf16 = reload_agent(model_file, precision="bf16", return_cand_scores=True)
    for context in CONTEXTS:
        ranked32, scores32 = rank(fp32, context, COLOURS)
        ranked16, scores16 = rank(bf16, context, COLOURS)
        assert ranked16[0] == ranked32[0], context
        by_text = dict(zip(ranked16, scores16.tolist()))
        largest = scores32.abs().max().item()
        for text, score in zip(ranked32, scores32.tolist()):
            assert abs(by_text[text] - score) <= SCORE_TOLERANCE * largest, (context, text)


@pytest.mark.slow
def test_training_in_bf16_keeps_float32_weights(trained_bf16):
    agent, model_file = trained_bf16
    loaded = reload_agent(model_file, precision="bf16")
    encoders = [m for m in loaded.model.modules() if isinstance(m, TextEncoder)]
    assert encoders and all(e.compute_dtype == torch.bfloat16 for e in encoders)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_bf16_full_learns_and_keeps_float32_weights(tiny_backbone, synthetic_task, tmp_path):
    """--precision bf16-full: the backbone trained wholly in bfloat16 learns the task; the
    weights saved are float32, and the model reloads with the setting."""
    model_file = str(tmp_path / "model")
    options = train_options("bi", tiny_backbone, synthetic_task, model_file, num_epochs=2, precision="bf16-full")
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6
    loaded = reload_agent(model_file)
    encoder = loaded.model.context_encoder
    assert loaded.precision == "bf16-full" and encoder.whole_backbone_in_compute_dtype
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "bfloat16_products_pay", lambda: True)
    assert precision.resolve("auto", use_cuda=False) == "bf16-full"
    monkeypatch.setattr(precision, "bfloat16_products_pay", lambda: False)
    assert precision.resolve("auto", use_cuda=False) == "fp32"
    assert precision.resolve("bf16", use_cuda=False) == "bf16"
    assert precision.resolve("bf16-full", use_cuda=False) == "bf16-full"
    # on CUDA only autocast has been measured
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve("auto", use_cuda=True) == "bf16"
    assert precision.compute_dtype("bf16-full") is torch.bfloat16
    assert precision.compute_dtype("fp32") is None


@pytest.mark.parametrize(
    "float32_seconds, bfloat16_seconds, native, pays",
    [(2.0, 1.0, True, True), (1.0, 2.0, True, False), (1.05, 1.0, True, False), (2.0, 1.0, False, False)],
)
def test_auto_picks_bfloat16_only_where_its_products_are_timed_faster(
    monkeypatch, float32_seconds, bfloat16_seconds, native, pays
):
    # instructions alone do not decide: on this machine's virtual CPU (AVX512-BF16 throughout)
    # bfloat16 products have run at 1.2-1.3x float32's speed in some sessions, 0.55x in others
    timed = {torch.float32: float32_seconds, torch.bfloat16: bfloat16_seconds}
    monkeypatch.setattr(precision, "product_seconds", lambda: timed)
    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    monkeypatch.setattr(precision, "bfloat16_products_faster", precision.bfloat16_products_faster.__wrapped__)
    assert precision.bfloat16_products_pay() is pays
    assert precision.resolve("auto", use_cuda=False) == ("bf16-full" if pays else "fp32")


def test_products_are_timed_in_both_dtypes_and_the_thread_count_restored():
    threads = torch.get_num_threads()
    seconds = precision.product_seconds()
    assert set(seconds) == {torch.float32, torch.bfloat16} and all(s > 0 for s in seconds.values())
    assert torch.get_num_threads() == threads


def test_products_are_timed_on_one_thread_and_a_failure_restores_the_thread_count(monkeypatch):
    seen, real_mm = [], torch.mm

    def mm(a, b):
        seen.append((a.dtype, torch.get_num_threads()))
        if len(seen) == 3:
            raise RuntimeError("oneDNN failed")
        return real_mm(a, b)

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "mm", mm)
    with pytest.raises(RuntimeError, match="oneDNN failed"):
        precision.product_seconds()
    assert {dtype for dtype, _ in seen} == {torch.float32, torch.bfloat16}
    assert {count for _, count in seen} == {1}
    assert torch.get_num_threads() == threads


def test_fp16_on_cpu_is_refused_by_name(tiny_backbone, synthetic_task, tmp_path):
    with pytest.raises(ParlaiPolyError, match="--precision fp16: float16 autocast needs a CUDA device"):
        TrainModel.main(**train_options("bi", tiny_backbone, synthetic_task, str(tmp_path / "m"), precision="fp16"))


def test_loss_scaler_skips_overflowing_steps_and_unscales_good_ones():
    scaler = precision.LossScaler(scale=8.0, growth_interval=2)
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([8.0, 16.0, float("inf")])
    assert not scaler.unscale([weight])
    scaler.update(False)
    assert scaler.scale == 4.0
    weight.grad = torch.tensor([4.0, 8.0, 12.0])
    assert scaler.unscale([weight])
    assert weight.grad.tolist() == [1.0, 2.0, 3.0]
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 8.0  # two good steps in a row: the scale grows back


@pytest.mark.slow
def test_length_sorted_batches_train_with_batch_negatives(tiny_backbone, synthetic_task, tmp_path):
    """ParlAI's --dynamic-batching batchsort: batches of similar lengths, the same batch size,
    and the other labels of the batch still the negatives that teach the model."""
    options = train_options("bi", tiny_backbone, synthetic_task, str(tmp_path / "m"), num_epochs=2)
    options.update(dynamic_batching="batchsort", text_truncate=32, label_truncate=16)
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6
    model = reload_agent(str(tmp_path / "m"))
    assert model.opt["dynamic_batching"] == "batchsort"


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["poly", "cross"])
def test_length_groups_train_and_stay_with_the_model(agent, tiny_backbone, synthetic_task, tmp_path):
    """--length-groups: random batches encoded in groups of similar length still learn the
    task, and the model file keeps the setting for the encoder that reloads it."""
    epochs = 5 if agent == "cross" else 2
    options = train_options(agent, tiny_backbone, synthetic_task, str(tmp_path / "m"), num_epochs=epochs, length_groups=3)
    valid, _ = TrainModel.main(**options)
    assert float(valid["R@1/8"]) >= 0.6
    model = reload_agent(str(tmp_path / "m"))
    encoder = model.model.encoder if agent == "cross" else model.model.context_encoder
    assert encoder.length_groups == 3


def test_training_agents_update_with_fused_adamw(tiny_backbone, synthetic_task, tmp_path):
    """ParlAI's adamw, built fused (BaseAgent.optim_opts), the codes' own group included."""
    from parlai.core.agents import create_agent

    options = train_options("poly", tiny_backbone, synthetic_task, str(tmp_path / "model"), codes_lr_multiplier=4.0)
    agent = create_agent(TrainModel.setup_args().parse_kwargs(**options))
    assert type(agent.optimizer) is torch.optim.AdamW
    assert [group["fused"] for group in agent.optimizer.param_groups] == [True, True]
    assert agent.optimizer.param_groups[1]["lr"] == 4 * agent.optimizer.param_groups[0]["lr"]


def test_validation_during_training_sees_each_update(tiny_backbone, synthetic_task):
    """The optimizer (torch's fused AdamW) writes the weights without moving their version
    counters; after every update the bfloat16 inference copy must still be that of the weights
    now, or validation during training scores the first validation's weights all along."""
    from parlai.core.agents import create_agent
    from parlai.core.params import ParlaiParser

    from helpers import model_options

    options = model_options("bi", tiny_backbone, synthetic_task, precision="bf16", learningrate=1e-2, datatype="train")
    agent = create_agent(ParlaiParser(True, True).parse_kwargs(**options))
    assert agent.optimizer.defaults.get("fused")
    encoder = agent.unwrapped_model.context_encoder
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 10, 102, 0, 0]])
    for _ in range(2):
        with torch.no_grad():
            encoder(ids)  # a validation: makes the copy
        agent.optimizer.zero_grad()
        agent.backward(encoder(ids)[0].square().mean())
        agent.update_params()
        with torch.no_grad():
            seen, _ = encoder(ids)
        cast = copy.deepcopy(encoder.backbone).to(torch.bfloat16)
        now = cast(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state.float()
        assert torch.equal(seen, now)
