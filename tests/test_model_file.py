"""Model files: safetensors weights, JSON-skeleton training state, atomic writes."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from parlai_poly.errors import ModelFileError
from parlai_poly.model_file import load_trainstate, load_weights, save_trainstate, save_weights
from parlai_poly.storage import atomic_write_text


def test_weights_round_trip_and_name_their_agent(tmp_path):
    path = str(tmp_path / "model")
    weights = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_weights(path, weights, agent="poly")
    loaded = load_weights(path, agent="poly")
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    with pytest.raises(ModelFileError, match="written by the 'poly' agent, not 'bi'.*parlai_poly.agents:poly"):
        load_weights(path, agent="bi")


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = str(tmp_path / "hf.safetensors")
    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(ModelFileError, match="not a parlai-poly model file"):
        load_weights(path, agent="bi")


@pytest.mark.parametrize("fused", [False, True])  # the agents' AdamW is fused (optim_opts)
def test_training_state_round_trips_without_pickle(tmp_path, fused):
    """Optimizer state has int keys, tensors, tuples and inf: all must come back."""
    path = str(tmp_path / "model")
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    param.grad = torch.ones(4)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "number_training_updates": 7, "lr_scheduler": {"best": float("inf")}}
    save_trainstate(path, state)
    loaded = load_trainstate(path)
    assert loaded["number_training_updates"] == 7
    assert loaded["lr_scheduler"]["best"] == float("inf")
    assert set(loaded["optimizer"]["state"]) == {0}  # int key kept
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    resumed = torch.nn.Parameter(param.detach().clone())
    fresh = torch.optim.AdamW([resumed], lr=0.1, fused=fused)
    fresh.load_state_dict(loaded["optimizer"])  # what ParlAI does on resume
    param.grad = resumed.grad = torch.full((4,), -2.0)
    optimizer.step()
    fresh.step()  # the resumed optimizer takes the step the uninterrupted one takes
    assert torch.allclose(resumed, param)
    assert load_trainstate(str(tmp_path / "missing")) is None


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "model.opt")
    atomic_write_text(path, json.dumps({"v": 1}))

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        save_trainstate(path[:-4], {"bad": Unserializable()})
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["model.opt"]  # no temporary files left behind
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # ordinary file mode, not mkstemp's
