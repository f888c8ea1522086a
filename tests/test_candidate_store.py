"""The fixed-candidate cache: reused while valid, rebuilt when anything it depends on changes."""
import json
import os

import pytest
import torch
from parlai.core.agents import create_agent_from_shared
from parlai.scripts.eval_model import EvalModel
from safetensors import safe_open

from helpers import make_agent, reload_agent
from parlai_poly.agents.dual_encoder import DualEncoderAgent
from parlai_poly.candidate_store import CandidateStore, CandidateVectors

COLOURS = "red blue green yellow orange purple pink brown".split()


def save_untrained(agent_type, folder, backbone):
    """An untrained bi or poly model saved to a model file (weights are all the cache needs)."""
    model_file = str(folder / "model")
    extra = ["--poly-n-codes", "4"] if agent_type == "poly" else []
    make_agent("-m", f"parlai_poly.agents:{agent_type}", "--hf-model", backbone, "-mf", model_file, *extra).save()
    return agent_type, model_file


@pytest.fixture(scope="module", params=["bi", "poly"])
def saved_model(request, tmp_path_factory, tiny_backbone):
    return save_untrained(request.param, tmp_path_factory.mktemp(f"store_{request.param}"), tiny_backbone)


@pytest.fixture(scope="module")
def saved_bi(tmp_path_factory, tiny_backbone):
    return save_untrained("bi", tmp_path_factory.mktemp("store_bi_only"), tiny_backbone)


@pytest.fixture
def model(saved_model, tmp_path):
    """A fresh copy of the saved model per test, so tests never see each other's caches."""
    return copy_model(saved_model, tmp_path)


@pytest.fixture
def bi_model(saved_bi, tmp_path):
    """The same for tests of the store itself, where the agent type does not matter."""
    return copy_model(saved_bi, tmp_path)


def copy_model(saved, tmp_path):
    agent_type, source = saved
    model_file = str(tmp_path / "model")
    for suffix in ("", ".opt", ".dict"):
        with open(source + suffix, "rb") as f, open(model_file + suffix, "wb") as g:
            g.write(f.read())
    cands = tmp_path / "replies.txt"
    cands.write_text("".join(f"it is {c}\n" for c in COLOURS) + "a somewhat longer reply about the weather today\n")
    return agent_type, model_file, str(cands)


def load(model_file, cands, **overrides):
    return reload_agent(model_file, eval_candidates="fixed", fixed_candidates_path=cands, datatype="valid", **overrides)


def cache_files(model_file):
    folder = os.path.dirname(model_file)
    return sorted(name for name in os.listdir(folder) if ".cands-" in name)


def cache_mtimes(model_file):
    folder = os.path.dirname(model_file)
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in cache_files(model_file)}


def fresh_encodings(agent):
    """What the model gives for the candidates right now, padded batch and all."""
    vecs = agent._make_candidate_vecs(agent.fixed_candidates)  # ParlAI's own vectorization
    agent.model.eval()
    with torch.no_grad():
        return vecs, agent.model.encode_candidates(vecs)


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    original = DualEncoderAgent.encode_candidates

    def counting(self, padded):
        calls.append(len(padded))
        return original(self, padded)

    monkeypatch.setattr(DualEncoderAgent, "encode_candidates", counting)
    return calls


def test_built_once_then_reused_without_encoding(model, count_encodes):
    _, model_file, cands = model
    first = load(model_file, cands)
    assert first.candidate_store.status == "built" and sum(count_encodes) == 9
    names = cache_files(model_file)
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".safetensors")
    assert not [n for n in os.listdir(os.path.dirname(model_file)) if n.endswith((".vecs", ".encs"))]  # no pickles
    tensor_file = os.path.join(os.path.dirname(model_file), names[1])
    mtime = os.stat(tensor_file).st_mtime_ns

    count_encodes.clear()
    second = load(model_file, cands)
    assert second.candidate_store.status == "reused" and count_encodes == []
    assert os.stat(tensor_file).st_mtime_ns == mtime
    # what the cache holds is what the model and ParlAI's vectorization give
    vecs, encs = fresh_encodings(second)
    assert torch.equal(second.fixed_candidate_vecs.long(), vecs)
    torch.testing.assert_close(second.fixed_candidate_encs, encs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.fixed_candidate_encs, second.fixed_candidate_encs, rtol=0, atol=0)
    with safe_open(tensor_file, framework="pt") as f:
        assert set(f.keys()) == {"vecs", "encs"}
    manifest = json.load(open(tensor_file[: -len(".safetensors")] + ".json"))
    assert manifest["key"]["num_candidates"] == 9 and len(manifest["key"]["weights_sha256"]) == 64


def test_changed_candidate_file_is_encoded_again(bi_model):
    _, model_file, cands = bi_model
    load(model_file, cands)
    with open(cands, "a") as f:
        f.write("it is gold\n")
    agent = load(model_file, cands)
    assert agent.candidate_store.status == "built"
    assert "candidate_file_sha256" in agent.candidate_store.reason
    assert agent.fixed_candidate_encs.size(0) == 10 and agent.fixed_candidates[-1] == "it is gold"
    assert len(cache_files(model_file)) == 2  # the same cache, replaced


def test_retrained_weights_in_the_same_model_file_are_encoded_again(model):
    agent_type, model_file, cands = model
    before = load(model_file, cands)
    old = before.fixed_candidate_encs.clone()
    with torch.no_grad():  # "retrain": change one weight of the candidate encoder, save in place
        before.model.context_encoder.backbone.encoder.layer[0].output.dense.weight.mul_(1.5)
    before.save(model_file)
    after = load(model_file, cands)
    assert after.candidate_store.status == "built"
    assert "weights_sha256" in after.candidate_store.reason
    assert not torch.allclose(after.fixed_candidate_encs, old)
    torch.testing.assert_close(after.fixed_candidate_encs, fresh_encodings(after)[1], rtol=1e-5, atol=1e-5)
    if agent_type == "poly":
        # weights that do not touch candidate encodings (the codes) keep the cache valid
        with torch.no_grad():
            after.model.codes.add_(1.0)
        after.save(model_file)
        assert load(model_file, cands).candidate_store.status == "reused"


@pytest.mark.parametrize("option, value", [("reduction_type", "first"), ("label_truncate", 4), ("similarity", "cosine")])
def test_changed_encoding_option_is_encoded_again(bi_model, option, value):
    _, model_file, cands = bi_model
    load(model_file, cands)
    agent = load(model_file, cands, **{option: value})
    assert agent.candidate_store.status == "built" and option in agent.candidate_store.reason
    torch.testing.assert_close(agent.fixed_candidate_encs, fresh_encodings(agent)[1], rtol=1e-5, atol=1e-5)
    if option == "label_truncate":
        assert agent.fixed_candidate_vecs.size(1) == 4
    if option == "similarity":  # cached as unit vectors
        torch.testing.assert_close(agent.fixed_candidate_encs.norm(dim=-1), torch.ones(len(agent.fixed_candidates)))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def bad_header(path):
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16)


def bad_manifest(path):
    with open(path[: -len(".safetensors")] + ".json", "w") as f:
        f.write('{"format": "parlai_poly.candidates", "key": ')


def other_tensors(path):
    """A tensor file of another build beside this manifest: same shapes, another key."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    metadata = {"format": "parlai_poly.candidates", "key_sha256": "0" * 64}
    save_file({k: v.clone() for k, v in tensors.items()}, path, metadata=metadata)


def rewritten_in_place(path):
    """The same size, the same header and key digest: only the encodings' bytes differ."""
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\x00" * 64)


@pytest.mark.parametrize("damage", [truncate, bad_header, bad_manifest, other_tensors, rewritten_in_place, os.remove])
def test_damaged_cache_is_rebuilt(bi_model, damage, parlai_warnings):
    _, model_file, cands = bi_model
    good = load(model_file, cands).fixed_candidate_encs.clone()
    tensor_file = os.path.join(os.path.dirname(model_file), cache_files(model_file)[1])
    damage(tensor_file)
    parlai_warnings.clear()
    agent = load(model_file, cands)
    assert agent.candidate_store.status == "built"
    assert any("encoding the candidates again" in message for message in parlai_warnings)
    torch.testing.assert_close(agent.fixed_candidate_encs, good, rtol=0, atol=0)
    assert load(model_file, cands).candidate_store.status == "reused"


def test_replace_rebuilds_and_no_model_file_stays_in_memory(bi_model, tmp_path, tiny_backbone):
    agent_type, model_file, cands = bi_model
    load(model_file, cands)
    assert load(model_file, cands, fixed_candidate_vecs="replace").candidate_store.status == "built"

    extra = ["--poly-n-codes", "4"] if agent_type == "poly" else []
    base = ["-m", f"parlai_poly.agents:{agent_type}", "--hf-model", tiny_backbone, *extra]
    base += ["-ecands", "fixed", "-fcp", cands]
    agent = make_agent(*base, "-dt", "valid")
    assert agent.candidate_store.status == "memory" and agent.fixed_candidate_encs.size(0) == 9
    cache_dir = tmp_path / "cache"
    agent = make_agent(*base, "-dt", "valid", "--candidate-cache-dir", str(cache_dir))
    assert agent.candidate_store.status == "built" and len(os.listdir(cache_dir)) == 2


def test_eval_model_and_interactive_use_the_store(model):
    _, model_file, cands = model
    with open(cands, "a") as f:
        f.write("today the cat please\n")  # the synthetic-like task below uses these texts
    task_dir = os.path.dirname(model_file)
    with open(os.path.join(task_dir, "task_valid.txt"), "w") as f:
        for i, colour in enumerate(COLOURS):
            f.write(f"text:hello the {colour} thing\tlabels:it is {colour}\tepisode_done:True\n")
    options = dict(
        task="fromfile:parlaiformat",
        fromfile_datapath=os.path.join(task_dir, "task"),
        fromfile_datatype_extension=True,
        model_file=model_file,
        datatype="valid",
        batchsize=4,
        eval_candidates="fixed",
        fixed_candidates_path=cands,
    )
    first = EvalModel.main(**options)
    assert int(first["exs"]) == 8 and "R@1/10" in first
    assert len(cache_files(model_file)) == 2
    assert not [n for n in os.listdir(task_dir) if n.endswith((".vecs", ".encs"))]
    second = EvalModel.main(**options)
    for key in ("R@1/10", "rank", "mrr", "hits@1", "hits@5", "loss"):
        assert float(first[key]) == float(second[key])

    agent = reload_agent(model_file, interactive_mode=True, fixed_candidates_path=cands)
    assert agent.candidate_store.status == "reused"
    agent.observe({"text": "hello the cat", "episode_done": True})
    reply = agent.act()
    assert reply["text"] in agent.fixed_candidates


def test_training_drops_encodings_made_with_older_weights(model):
    """ParlAI keeps a shared copy's fixed encodings after training; ours are re-made."""
    _, model_file, cands = model
    agent = reload_agent(
        model_file, eval_candidates="fixed", fixed_candidates_path=cands, datatype="train",
        learningrate=0.1, freeze_embeddings=False, warmup_updates=-1,
    )
    assert agent.fixed_candidate_encs is None  # a training agent encodes when it first evaluates
    copy = create_agent_from_shared(agent.share())
    copy.observe({"text": "hello the red thing", "eval_labels": ["it is red"], "episode_done": True})
    copy.act()
    before = copy.fixed_candidate_encs.clone()
    torch.testing.assert_close(before, fresh_encodings(copy)[1], rtol=1e-5, atol=1e-5)
    cached = cache_mtimes(model_file)
    for text in ("hello the red thing", "hello the blue thing"):
        agent.observe({"text": text, "labels": ["it is red"], "episode_done": True})
        agent.act()  # one training step
    copy.observe({"text": "hello the red thing", "eval_labels": ["it is red"], "episode_done": True})
    copy.act()
    assert not torch.allclose(copy.fixed_candidate_encs, before)
    torch.testing.assert_close(copy.fixed_candidate_encs, fresh_encodings(copy)[1], rtol=1e-5, atol=1e-5)
    # not yet trained, the first encodings went through the cache; weights in flux never do
    assert cache_mtimes(model_file) == cached


def test_candidate_vectors_pad_like_parlai():
    vecs = [torch.tensor([101, 5, 102]), torch.tensor([101, 102]), torch.tensor([101, 7, 8, 9, 102])]
    vectors = CandidateVectors.from_texts(["a", "b", "c"], lambda texts: [vecs["abc".index(t)] for t in texts])
    padded = vectors.padded(0)
    assert padded.dtype == torch.int32
    assert padded.tolist() == [[101, 5, 102, 0, 0], [101, 102, 0, 0, 0], [101, 7, 8, 9, 102]]
    assert CandidateStore.location(None, "/x/cands.txt") is None
    a = CandidateStore.location("/m/model", "/x/cands.txt")
    assert a.startswith("/m/model.cands-cands-") and a != CandidateStore.location("/m/model", "/y/cands.txt")


def test_without_a_candidates_file_the_task_labels_are_collected_once_and_announced(model, parlai_warnings):
    """No --fixed-candidates-path: the task's distinct train labels become the candidates,
    with a warning naming the file; encoding them says how many and about how long."""
    from parlai.utils import logging as parlai_logging

    _, model_file, _ = model
    task_dir = os.path.dirname(model_file)
    with open(os.path.join(task_dir, "task_train.txt"), "w") as f:
        for colour in COLOURS * 2:  # every label twice
            f.write(f"text:hello the {colour} thing\tlabels:it is {colour}\tepisode_done:True\n")
    task = dict(task="fromfile:parlaiformat", fromfile_datapath=os.path.join(task_dir, "task"), fromfile_datatype_extension=True)
    said = []

    def hear(record):
        said.append(record.getMessage())
        return True

    parlai_logging.logger.addFilter(hear)
    try:
        agent = reload_agent(model_file, eval_candidates="fixed", datatype="valid", encode_candidate_vecs_batchsize=3, **task)
    finally:
        parlai_logging.logger.removeFilter(hear)
    path = f"{model_file}.cands-fromfile:parlaiformat.cands"
    with open(path) as f:
        assert f.read().splitlines() == [f"it is {c}" for c in COLOURS]  # distinct, in order
    assert agent.fixed_candidates == [f"it is {c}" for c in COLOURS]
    assert any(path in m and "--fixed-candidates-path FILE" in m for m in parlai_warnings)
    assert any(m.startswith("Encoding 8 candidates once: about") for m in said)
    os.utime(path, (1, 1))
    reload_agent(model_file, eval_candidates="fixed", datatype="valid", **task)
    assert os.stat(path).st_mtime == 1  # collected once


# ---- the store's dtype (--candidate-store-dtype) -----------------------------------------
def tensor_file_of(model_file):
    return os.path.join(os.path.dirname(model_file), cache_files(model_file)[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_store_is_written_in_its_dtype_and_read_back(model, dtype, count_encodes):
    from parlai_poly.modules.stored import StoredCandidates, TORCH_DTYPES

    _, model_file, cands = model
    agent = load(model_file, cands, candidate_store_dtype=dtype)
    assert agent.candidate_store.status == "built" and agent.candidate_store.dtype == dtype
    path = tensor_file_of(model_file)
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        encs = f.get_tensor("encs")
        exact = f.get_tensor("encs_float32" if dtype != "float32" else "encs")
        scales = f.get_tensor("scales") if dtype == "int8" else None
    expected = {"float32": {"vecs", "encs"}, "bfloat16": {"vecs", "encs", "encs_float32"},
                "int8": {"vecs", "encs", "scales", "encs_float32"}}[dtype]
    assert names == expected and encs.dtype == TORCH_DTYPES[dtype] and exact.dtype == torch.float32
    manifest = json.load(open(path[: -len(".safetensors")] + ".json"))
    assert manifest["key"]["store_dtype"] == dtype
    assert manifest["tensors"]["encs"]["dtype"] == {"float32": "F32", "bfloat16": "BF16", "int8": "I8"}[dtype]
    # the float32 encodings are the model's; the compact copy is quantized from them
    torch.testing.assert_close(agent.fixed_candidate_encs, fresh_encodings(agent)[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(agent.fixed_candidate_encs, exact)
    expect = StoredCandidates.quantize(exact, dtype)
    assert torch.equal(encs, expect.values)
    if scales is not None:
        assert torch.equal(scales, expect.scales)
    stored = agent.fixed.stored_for(agent.fixed_candidate_encs)
    assert (stored is not None) == (dtype != "float32")

    count_encodes.clear()
    again = load(model_file, cands, candidate_store_dtype=dtype)
    assert again.candidate_store.status == "reused" and count_encodes == []
    assert torch.equal(again.fixed_candidate_encs, agent.fixed_candidate_encs)


def test_changing_the_store_dtype_converts_without_encoding(bi_model, count_encodes):
    """A store of another dtype is never read as this one; its float32 encodings are
    rewritten in the dtype asked for, without encoding the candidates again."""
    _, model_file, cands = bi_model
    first = load(model_file, cands)  # auto on a CPU without bfloat16 units (conftest): float32
    assert first.candidate_store.dtype == "float32" and sum(count_encodes) == 9
    exact = first.fixed_candidate_encs.clone()
    for dtype in ("int8", "bfloat16", "float32"):
        count_encodes.clear()
        agent = load(model_file, cands, candidate_store_dtype=dtype)
        store = agent.candidate_store
        assert store.status == "converted" and "store_dtype" in store.reason and count_encodes == []
        assert torch.equal(agent.fixed_candidate_encs, exact)
        with safe_open(tensor_file_of(model_file), framework="pt") as f:
            assert str(f.get_slice("encs").get_dtype()) == {"int8": "I8", "bfloat16": "BF16", "float32": "F32"}[dtype]
        assert load(model_file, cands, candidate_store_dtype=dtype).candidate_store.status == "reused"
    assert len(cache_files(model_file)) == 2  # one store, rewritten in place


def test_a_store_from_before_the_dtype_option_is_converted_not_encoded(bi_model, count_encodes):
    """Stores written before --candidate-store-dtype have no store_dtype in their key: float32."""
    from safetensors.torch import load_file, save_file

    from parlai_poly.candidate_store import FORMAT, VERSION
    from parlai_poly.storage import CheckedFile, key_sha256

    _, model_file, cands = bi_model
    load(model_file, cands)
    path = tensor_file_of(model_file)
    manifest_path = path[: -len(".safetensors")] + ".json"
    manifest = json.load(open(manifest_path))
    old_key = {k: v for k, v in manifest["key"].items() if k != "store_dtype"}
    save_file(load_file(path), path, metadata={"format": FORMAT, "key_sha256": key_sha256(old_key)})
    CheckedFile(path, manifest_path, FORMAT, VERSION).record(old_key, tensors=manifest["tensors"])
    count_encodes.clear()
    agent = load(model_file, cands, candidate_store_dtype="float32")
    assert agent.candidate_store.status == "converted" and count_encodes == []
    assert json.load(open(manifest_path))["key"]["store_dtype"] == "float32"


def test_damaged_compact_store_is_rebuilt(bi_model, parlai_warnings):
    _, model_file, cands = bi_model
    good = load(model_file, cands, candidate_store_dtype="int8").fixed_candidate_encs.clone()
    rewritten_in_place(tensor_file_of(model_file))  # the end of the file: float32 encodings
    parlai_warnings.clear()
    agent = load(model_file, cands, candidate_store_dtype="int8")
    assert agent.candidate_store.status == "built"
    assert any("sha256 mismatch" in message for message in parlai_warnings)
    torch.testing.assert_close(agent.fixed_candidate_encs, good, rtol=0, atol=0)


def test_store_dtype_auto_is_bfloat16_only_where_it_pays(monkeypatch):
    from parlai_poly import precision

    monkeypatch.setattr(precision, "bfloat16_products_pay", lambda: True)
    many, few = precision.BF16_AUTO_MIN_CANDIDATES, precision.BF16_AUTO_MIN_CANDIDATES - 1
    assert precision.resolve_store_dtype("auto", False, many) == "bfloat16"
    assert precision.resolve_store_dtype("auto", False, few) == "float32"
    assert precision.resolve_store_dtype("auto", True, many) == "float32"  # a GPU
    assert precision.resolve_store_dtype("int8", False, few) == "int8"  # asked for: always
    monkeypatch.setattr(precision, "bfloat16_products_pay", lambda: False)  # timed slower, or emulated
    assert precision.resolve_store_dtype("auto", False, many) == "float32"
    with pytest.raises(ValueError, match="--candidate-store-dtype fp8: choose one of auto, float32, bfloat16, int8"):
        precision.resolve_store_dtype("fp8", False, many)


def test_bad_store_options_name_the_option(bi_model):
    from parlai_poly.errors import ParlaiPolyError

    _, model_file, cands = bi_model
    with pytest.raises(ParlaiPolyError, match="--candidate-store-dtype half: choose one of"):
        load(model_file, cands, candidate_store_dtype="half")
    with pytest.raises(ParlaiPolyError, match="--rescore-top-k -2: give -1"):
        load(model_file, cands, rescore_top_k=-2)
