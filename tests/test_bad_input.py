"""Bad input gets an error that names the problem and the fix."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import make_agent
from parlai_poly.errors import BackboneError, CandidateFileError, ModelFileError, ParlaiPolyError


def test_backbone_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(BackboneError, match=f"--hf-model {missing}: not a local model directory"):
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", missing)


def test_backbone_directory_without_config(tmp_path):
    with pytest.raises(BackboneError, match="no config.json there"):
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", str(tmp_path))


def test_backbone_that_is_not_an_encoder(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="is not a text encoder"):
        make_agent("-m", "parlai_poly.agents:poly", "--hf-model", str(tmp_path))


def test_poly_with_no_codes(tiny_backbone):
    with pytest.raises(ParlaiPolyError, match="--poly-n-codes 0: the poly-encoder needs at least 1 code"):
        make_agent("-m", "parlai_poly.agents:poly", "--hf-model", tiny_backbone, "--poly-n-codes", "0")


def test_length_groups_below_one(tiny_backbone):
    with pytest.raises(ParlaiPolyError, match="--length-groups 0: must be 1"):
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--length-groups", "0")


def test_cross_encoder_with_encoded_candidate_vectors(tiny_backbone):
    with pytest.raises(ParlaiPolyError, match="--encode-candidate-vecs true: a cross-encoder"):
        make_agent("-m", "parlai_poly.agents:cross", "--hf-model", tiny_backbone, "--encode-candidate-vecs", "true")


def test_truncation_longer_than_the_backbone(tiny_backbone):
    with pytest.raises(ParlaiPolyError, match="--text-truncate 600: must be between 3 and the backbone's 512"):
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "--text-truncate", "600")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "the file has no candidates"),
        (b"\n\n", "the file has no candidates"),
        (b"fine\n\xff\xfe broken\n", r"line 2: not UTF-8"),
    ],
)
def test_fixed_candidates_file(tiny_backbone, tmp_path, content, message):
    path = tmp_path / "cands.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CandidateFileError, match=message) as err:
        make_agent("-m", "parlai_poly.agents:bi", "--hf-model", tiny_backbone, "-ecands", "fixed", "-fcp", str(path))
    assert str(path) in str(err.value)


def test_pickled_model_file_is_never_unpickled(tiny_backbone, tmp_path):
    """A torch checkpoint (as ParlAI's own agents write) is refused, not loaded."""
    model_file = tmp_path / "parlai_model"
    torch.save({"model": {}}, model_file)
    with pytest.raises(ModelFileError, match="pickled torch checkpoint"):
        make_agent("-m", "parlai_poly.agents:poly", "--hf-model", tiny_backbone, "--init-model", str(model_file))


@pytest.mark.slow
def test_command_line_error_is_one_line_without_traceback(tiny_backbone, tmp_path):
    parlai = os.path.join(os.path.dirname(sys.executable), "parlai")
    result = subprocess.run(
        [parlai, "train_model", "-t", "integration_tests", "-m", "parlai_poly.agents:poly", "-mf", str(tmp_path / "m"), "--hf-model", tiny_backbone, "--poly-n-codes", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "parlai-poly: error: --poly-n-codes 0" in result.stderr
    assert "Traceback" not in result.stderr
