"""Exports (parlai_poly/export.py): sentence-transformers directories and ONNX graphs that give
our encodings and scores, written whole or not at all, and what is refused."""
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from parlai.scripts.train_model import TrainModel

from helpers import make_agent, train_options
from parlai_poly import Ranker, export

COLOURS = [f"it is {c}" for c in "red blue green yellow orange purple pink brown".split()]
# the last context is longer than --text-truncate (128): kept from its end
CONTEXTS = ["today the cat please", "hi", "now the horse again", "quickly the dog " * 60]
LONG_CANDIDATE = "it is red and blue " * 20  # over --label-truncate (64) word pieces
EMBEDDING_ATOL = 1e-5  # float32, the same products in another order
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module", params=("bi", "poly"))
def exported(request, tmp_path_factory, tiny_backbone, synthetic_task):
    """A trained model of each kind, exported to ONNX and (its candidate side, and a
    bi-encoder's context side too) to sentence-transformers, one of them from the command line."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"export_{kind}")
    model_file = str(folder / "model")
    # the bi-encoder gets its own candidate encoder and MLP (each side must export its own
    # weights) and cosine similarity (unit vectors, the context's scaled); the poly-encoder dot
    extra = dict(share_encoders=False, candidate_mlp=True, similarity="cosine", similarity_scale=20.0) if kind == "bi" else {}
    TrainModel.main(**train_options(kind, tiny_backbone, synthetic_task, model_file, num_epochs=1, **extra))
    outs = {"onnx": str(folder / "onnx"), "candidate": str(folder / "st_candidate")}
    export.to_onnx(model_file, outs["onnx"])
    assert export.main(["sentence-transformers", model_file, outs["candidate"]]) == 0
    if kind == "bi":
        outs["context"] = str(folder / "st_context")
        export.to_sentence_transformers(model_file, outs["context"], side="context")
    return kind, model_file, outs


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_backbone):
    """Model files of a fresh cross-encoder and of a poly-encoder of the other branches: the
    first m outputs (n_first, m longer than short contexts), multihead attention, max pooling."""
    folder = tmp_path_factory.mktemp("untrained")
    files = {"cross": str(folder / "cross"), "poly": str(folder / "poly")}
    make_agent("-m", "parlai_poly.agents:cross", "--hf-model", tiny_backbone).save(files["cross"])
    make_agent(
        "-m", "parlai_poly.agents:poly", "--hf-model", tiny_backbone, "--poly-n-codes", "4",
        "--polyencoder-type", "n_first", "--poly-attention-type", "multihead", "--reduction-type", "max",
    ).save(files["poly"])
    return files


def ranker_scores(model_file, contexts, candidates) -> np.ndarray:
    """[B, N]: Ranker.rank's scores, in the candidates' order."""
    ranker = Ranker.load(model_file)
    rows = []
    for context in contexts:
        scores = dict(ranker.rank(context, candidates))
        rows.append([scores[c] for c in candidates])
    return np.array(rows, dtype=np.float32)


def st_model(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


# ---- sentence-transformers -----------------------------------------------------------------
@pytest.mark.slow
def test_sentence_transformers_gives_our_candidate_encodings(exported):
    kind, model_file, outs = exported
    model = st_model(outs["candidate"])
    texts = COLOURS + CONTEXTS[:3] + [LONG_CANDIDATE]  # the long one cut alike: [SEP] kept
    theirs = model.encode(texts, convert_to_numpy=True)
    ours = Ranker.load(model_file).encode(texts).numpy()
    assert np.abs(theirs - ours).max() <= EMBEDDING_ATOL
    assert model.similarity_fn_name == "dot" and model.max_seq_length == 64  # --label-truncate
    # Transformer, Pooling and, for the bi-encoder's --candidate-mlp, two Dense; Normalize for
    # its --similarity cosine only
    names = [type(m).__name__ for m in model]
    assert names == ["Transformer", "Pooling"] + (["Dense", "Dense", "Normalize"] if kind == "bi" else [])
    if kind == "bi":
        assert np.allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    manifest = export.read_manifest(outs["candidate"])
    assert (manifest["export"], manifest["side"], manifest["agent"]) == ("sentence-transformers", "candidate", kind)
    assert manifest["fidelity"]["max_abs_diff"] <= EMBEDDING_ATOL and "cut_texts" not in manifest["fidelity"]


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["bi"], indirect=True)
def test_sentence_transformers_context_side_scores_as_the_ranker(exported):
    """A bi-encoder's two sides: their dot products are Ranker.rank's scores, a context longer
    than --text-truncate included (the tokenizer keeps its end, as our agents do)."""
    _, model_file, outs = exported
    contexts = st_model(outs["context"]).encode(CONTEXTS, convert_to_numpy=True)
    candidates = st_model(outs["candidate"]).encode(COLOURS, convert_to_numpy=True)
    assert np.abs(contexts @ candidates.T - ranker_scores(model_file, CONTEXTS, COLOURS)).max() <= SCORE_ATOL
    # the sides differ (--share-encoders false, the MLP): a swapped side would not score so
    assert np.abs(contexts[:1] - st_model(outs["candidate"]).encode(CONTEXTS[:1])).max() > 1e-3
    # --similarity cosine: contexts are --similarity-scale times unit vectors
    assert np.allclose(np.linalg.norm(contexts, axis=1), 20.0, atol=1e-4)
    assert export.read_manifest(outs["context"])["trained_similarity"].startswith("cosine x 20")


@pytest.fixture
def parlai_cut_model(exported, tmp_path):
    """The trained model as a file saved before --label-truncation: trained with ParlAI's cut."""
    _, model_file, _ = exported
    copy = str(tmp_path / "model")
    for suffix in ("", ".dict"):
        shutil.copyfile(model_file + suffix, copy + suffix)
    with open(model_file + ".opt") as f:
        opt = json.load(f)
    del opt["label_truncation"]
    with open(copy + ".opt", "w") as f:
        json.dump(dict(opt, model_file=copy), f)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["bi"], indirect=True)
def test_a_model_trained_with_parlais_cut_exports_its_long_candidates_as_documented(parlai_cut_model, tmp_path):
    """ParlAI's cut drops a long candidate's [SEP]: the ONNX layout reproduces it; the
    sentence-transformers tokenizer keeps [SEP] and one word piece less (the encoding of the text
    cut to --label-truncate - 2 word pieces), measured apart in the manifest."""
    ranker = Ranker.load(parlai_cut_model)
    pieces = ranker.agent.dict.txt2vec(LONG_CANDIDATE)
    limit = ranker.agent.label_truncate
    assert len(pieces) > limit and ranker.agent.opt["label_truncation"] == "parlai"
    st_dir, onnx_dir = str(tmp_path / "st"), str(tmp_path / "onnx")
    manifest = export.to_sentence_transformers(parlai_cut_model, st_dir)
    assert manifest["fidelity"]["cut_texts"] == 1 and "ParlAI's cut" in manifest["truncation"]
    kept = ranker.agent.dict.tokenizer.decode(pieces[: limit - 2])
    theirs = st_model(st_dir).encode([LONG_CANDIDATE], convert_to_numpy=True)
    assert np.abs(theirs - ranker.encode([kept]).numpy()).max() <= EMBEDDING_ATOL
    assert np.abs(theirs - ranker.encode([LONG_CANDIDATE]).numpy()).max() > 1e-4
    export.to_onnx(parlai_cut_model, onnx_dir)
    encoded = export.OnnxRanker(onnx_dir).encode([LONG_CANDIDATE, "it is red"])
    assert np.abs(encoded - ranker.encode([LONG_CANDIDATE, "it is red"]).numpy()).max() <= EMBEDDING_ATOL


# ---- ONNX ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_onnx_scores_equal_the_rankers(exported):
    """onnxruntime on ids that token_ids lays out from the exported tokenizer: the scores of
    Ranker.rank for contexts and candidates both short and cut, batched or one at a time."""
    _, model_file, outs = exported
    onnx = export.OnnxRanker(outs["onnx"])
    candidates = COLOURS + [LONG_CANDIDATE]
    encoded = onnx.encode(candidates)
    scores = onnx.score(CONTEXTS, encoded)  # [4, 9]
    assert np.abs(scores - ranker_scores(model_file, CONTEXTS, candidates)).max() <= SCORE_ATOL
    alone = onnx.score(CONTEXTS[1:2], onnx.encode(candidates, batch_size=1))  # other batch and length axes
    assert np.abs(alone - scores[1:2]).max() <= SCORE_ATOL
    assert np.abs(encoded - Ranker.load(model_file).encode(candidates).numpy()).max() <= EMBEDDING_ATOL


@pytest.mark.slow
def test_onnx_export_of_n_first_multihead_poly_scores_as_the_ranker(untrained, tmp_path):
    """The other scoring branch (folded multihead) and contexts shorter than m (n_first pads)."""
    out = str(tmp_path / "onnx")
    manifest = export.to_onnx(untrained["poly"], out)
    onnx = export.OnnxRanker(out)
    scores = onnx.score(CONTEXTS, onnx.encode(COLOURS))
    assert np.abs(scores - ranker_scores(untrained["poly"], CONTEXTS, COLOURS)).max() <= SCORE_ATOL
    files = sorted(os.listdir(out))
    assert files == ["candidate.onnx", "context.onnx", export.MANIFEST, "tokenizer.json", "tokenizer_config.json"]
    assert manifest == json.loads((tmp_path / "onnx" / export.MANIFEST).read_text())
    assert manifest["context"]["outputs"] == {"scores": "float32 [batch, candidates]"}


# ---- refused -------------------------------------------------------------------------------
def test_a_cross_encoder_is_refused_by_both_exports(untrained, tmp_path, capsys):
    out = tmp_path / "out"
    for run in (export.to_onnx, export.to_sentence_transformers):
        with pytest.raises(export.ExportError, match="cross-encoder reads each candidate together with its context"):
            run(untrained["cross"], str(out))
    assert export.main(["onnx", untrained["cross"], str(out)]) == 2
    assert "parlai-poly: error:" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, nothing staged


def test_the_context_side_of_a_poly_encoder_is_refused_for_sentence_transformers(untrained, tmp_path):
    with pytest.raises(export.ExportError, match=r"m context vectors .* to ONNX \(python -m parlai_poly.export onnx"):
        export.to_sentence_transformers(untrained["poly"], str(tmp_path / "out"), side="context")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("what", ["folder", "file"])
def test_an_out_dir_we_did_not_make_is_left_alone(untrained, tmp_path, what):
    out = tmp_path / "theirs"
    if what == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    for run in (export.to_onnx, export.to_sentence_transformers):
        with pytest.raises(export.ExportError, match=re.escape(f"{out}: exists and is not an export of ours")):
            run(untrained["poly"], str(out))
    assert (out / "notes.txt" if what == "folder" else out).read_text() == "mine"
    assert os.listdir(tmp_path) == ["theirs"]


@pytest.mark.slow
def test_an_export_replaces_an_earlier_one_of_ours_and_a_failed_one_changes_nothing(untrained, tmp_path, monkeypatch):
    out = tmp_path / "st"
    export.to_sentence_transformers(untrained["poly"], str(out))
    (out / "left_over.txt").write_text("from before")
    export.to_sentence_transformers(untrained["poly"], str(out))  # replaces the whole folder
    assert not (out / "left_over.txt").exists()
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every check fails, after everything was staged
    with pytest.raises(export.ExportError, match="differ from ours by .* so nothing was written"):
        export.to_sentence_transformers(untrained["poly"], str(out))
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()} == before
    assert os.listdir(tmp_path) == ["st"]  # no staged folder left behind
    ours = Ranker.load(untrained["poly"]).encode(COLOURS).numpy()
    assert np.abs(st_model(str(out)).encode(COLOURS) - ours).max() <= EMBEDDING_ATOL


def test_a_version_1_onnx_manifest_reads_as_parlais_cut(tmp_path):
    """Version 1 wrote "keep": "start" for ParlAI's cut (then every model's); it still lays out so."""
    manifest = {"format": export.FORMAT, "version": 1, "export": "onnx", "candidate": {"keep": "start"}}
    (tmp_path / export.MANIFEST).write_text(json.dumps(manifest))
    assert export.read_manifest(str(tmp_path))["candidate"]["keep"] == "start-parlai"
    layout = {"keep": "middle", "start_token_id": 1, "end_token_id": 2, "max_length": 4}
    with pytest.raises(export.ExportError, match="layout keep 'middle'"):
        export._laid_out(FakeTokenizer(), ["hi"], layout)


class FakeTokenizer:
    def encode_batch(self, texts, add_special_tokens):
        return [SimpleNamespace(ids=[5]) for _ in texts]
