"""Model files without pickle: safetensors for tensors, JSON for everything else.

A model file ``PATH`` is a safetensors file of the model's weights whose metadata names the
agent that wrote it. Training state (optimizer, schedulers, update count) goes beside it in
``PATH.trainstate``, also safetensors: its tensors stored flat, and the nesting and non-tensor
values kept as JSON in the metadata, so nothing is ever unpickled. Every write is atomic.

The two files of one save share a ``save_id`` in their metadata, and the weights are written
last. A save interrupted between the two leaves a train state of one save beside the weights
of another: ``load_trainstate`` sees their ids differ and refuses to resume from the mixture.
"""
import contextlib
import json
import os
import uuid
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ModelFileError
from .storage import atomic_write

FORMAT = "parlai_poly"
TRAINSTATE_SUFFIX = ".trainstate"


def is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte header length then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def new_save_id() -> str:
    return uuid.uuid4().hex


def save_weights(path: str, state_dict: Dict[str, torch.Tensor], agent: str, save_id: Optional[str] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "agent": agent}
    if save_id:
        metadata["save_id"] = save_id
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str) -> Dict[str, str]:
    with readable(path):
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}


@contextlib.contextmanager
def readable(path: str):
    """Turn safetensors' errors on a cut-short or damaged file into a sentence naming it."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        advice = "restore the file from a complete copy, or train again"
        if path.endswith(TRAINSTATE_SUFFIX):  # only resuming needs it
            advice = f"restore it, or move it away (evaluating needs only {path[: -len(TRAINSTATE_SUFFIX)]})"
        raise ModelFileError(
            f"{path}: damaged or cut short ({str(e).splitlines()[0][:120]}). A save or copy was "
            f"probably interrupted: {advice}."
        ) from None


def load_weights(path: str, agent: str) -> Dict[str, torch.Tensor]:
    """Load weights written by ``agent``; explain what to do with any other file."""
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file {path} does not exist.")
    if not is_safetensors(path):
        raise ModelFileError(
            f"{path} is not a parlai-poly model file (safetensors). It looks like a pickled "
            "torch checkpoint, such as ParlAI's own transformer/* agents write; parlai-poly "
            "never unpickles model files. Train a parlai-poly model, or start from the "
            "default backbone by leaving out --init-model."
        )
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{path} is a safetensors file but not a parlai-poly model file (no "
            f"'format: {FORMAT}' in its metadata). To use Hugging Face weights, pass their "
            "directory with --hf-model."
        )
    if meta.get("agent") != agent:
        raise ModelFileError(
            f"{path} was written by the '{meta.get('agent')}' agent, not '{agent}'. Load it "
            f"with -m parlai_poly.agents:{meta.get('agent')}, or train a new model file."
        )
    with readable(path):
        return load_file(path)


def _flatten(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Replace tensors by references and dicts by key/value lists (keeps int keys)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors) for v in obj]
    return obj


def _unflatten(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_trainstate(path: str, state: Dict[str, Any], save_id: Optional[str] = None) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_flatten(state, tensors))
    metadata = {"format": FORMAT + ".trainstate", "state": skeleton}
    if save_id:
        metadata["save_id"] = save_id
    atomic_write(
        path + TRAINSTATE_SUFFIX, lambda tmp: save_file(tensors, tmp, metadata=metadata)
    )


def load_trainstate(path: str) -> Optional[Dict[str, Any]]:
    """The training state saved beside model file ``path``, or None if there is none."""
    full = path + TRAINSTATE_SUFFIX
    if not os.path.isfile(full):
        return None
    meta = read_metadata(full)
    weights_id = read_metadata(path).get("save_id") if os.path.isfile(path) else None
    if meta.get("save_id") != weights_id and (meta.get("save_id") or weights_id):
        raise ModelFileError(
            f"{full} and {path} come from different saves (a save was interrupted between "
            "them): resuming would pair these weights with another step's optimizer state. "
            f"To continue from the weights with a fresh optimizer, move {full} away; "
            "otherwise restore both files from the same save."
        )
    with readable(full):
        return _unflatten(json.loads(meta["state"]), load_file(full))


def split_states(states: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """ParlAI's states dict -> (model weights, everything else)."""
    rest = {k: v for k, v in states.items() if k != "model"}
    return states.get("model", {}), rest
