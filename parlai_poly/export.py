"""Export a model file's encoders for use outside ParlAI.

    python -m parlai_poly.export sentence-transformers MODEL OUT_DIR [--side candidate|context]
    python -m parlai_poly.export onnx MODEL OUT_DIR

``to_sentence_transformers``: one side of a bi-encoder (its context or its candidate encoder),
or the candidate side of a poly-encoder, as a sentence-transformers model directory built from
sentence-transformers' own modules: Transformer (the backbone with that side's weights and our
tokenizer), Pooling as ours pools (first -> cls, mean, max) and, for ``--candidate-mlp``, its
Linear-ReLU-Linear as two Dense modules; for ``--similarity cosine``, Normalize (and on the
context side a Dense that multiplies by ``--similarity-scale``). Our scores are dot products of
these embeddings, so the model's similarity is ``dot``.
``SentenceTransformer(OUT_DIR).encode(texts)`` then gives our encodings: our candidate encoder
in the sentence-transformers ecosystem (semantic search over responses, its evaluators, vector
stores that take a SentenceTransformer).

``to_onnx``: both sides, float32, for serving runtimes that have neither torch nor ParlAI:
- ``candidate.onnx``: input_ids, attention_mask [N, L] -> embeddings [N, d] (what our agents cache);
- ``context.onnx``, bi-encoder: input_ids, attention_mask [B, T] -> embeddings [B, d]; the score
  is the dot product with a candidate's embedding, so any inner-product index serves it;
- ``context.onnx``, poly-encoder: input_ids, attention_mask [B, T] and candidate embeddings
  [N, d] -> scores [B, N]. The codes' attention over the context and each candidate's attention
  over the m context vectors are in the graph, so its scores are ours for every attention type
  and a server needs no scoring code of its own (the alternative, context vectors [B, m, d]
  out, would leave a different softmax-and-sum to write per attention type).
Beside them: the backbone's tokenizer files and ``parlai_poly_export.json``, which says how
texts become ids; ``token_ids`` does it, and ``OnnxRanker`` runs the export with onnxruntime,
tokenizers and numpy only.

How texts become ids, in both exports as in our agents (``agents/base.py``):
- a context: [CLS] + its last ``--text-truncate`` - 2 word pieces + [SEP] (the latest turns kept);
- a candidate: [CLS] + its first ``--label-truncate`` - 2 word pieces + [SEP], as
  sentence-transformers' tokenizer lays it out (``--label-truncation end-kept``, our default).
  Models trained with ParlAI's cut (``--label-truncation parlai``: model files saved before the
  option) wrap first and keep the first ``--label-truncate`` ids, so a longer candidate loses
  its [SEP]; their sentence-transformers candidate side gives our encodings only for texts of at
  most ``--label-truncate`` - 2 word pieces (fidelity: cut_texts). The ONNX layout is exact for all.

Every export is staged in a new folder beside OUT_DIR and checked there against the model (ours
in float32, on short texts and one longer than every truncation); only then does it replace
OUT_DIR. So a failed export leaves nothing behind, and OUT_DIR is replaced only when it is
absent, empty or an export of ours (it holds ``parlai_poly_export.json``).
"""
import argparse
import contextlib
import copy
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ParlaiPolyError
from .modules.poly_encoder import _foldable
from .storage import atomic_write_text, replace_dir

MANIFEST = "parlai_poly_export.json"  # in every export: what it is, and proof that we made it
# 2: candidates laid out "start" (end token kept) or "start-parlai"; every version-1 export's
# "start" was ParlAI's cut (read_manifest says so)
FORMAT, VERSION = "parlai-poly-export", 2
SIDES = ("candidate", "context")
ST_POOLING = {"first": "cls", "mean": "mean", "max": "max"}  # ours -> sentence-transformers' pooling_mode
OPSET = 18  # what the torch.onnx exporter writes and onnxruntime has run since 1.14
SINGLE_FILE_BYTES = 1800 * 2**20  # protobuf caps one .onnx file at 2 GiB: larger weights go beside it
TOLERANCE = 1e-4  # an export whose outputs differ more from ours on CHECK_TEXTS is not written
ST_TRUNCATION = {
    "context": "keeps the end (the latest turns), as our agents do",
    "candidate": "keeps the start and the [SEP], as our agents do",
    "candidate-parlai": "keeps the start and the [SEP]: a text over max_seq_length - 2 word pieces reads "
    "one word piece less than in this model, trained with ParlAI's cut (fidelity: cut_texts)",
}
# Options that change how a context becomes tokens, beyond the plain layout exports reproduce
CONTEXT_LAYOUT_OPTIONS = ("history_reversed", "person_tokens", "history_add_global_end_token")
# Warnings of torch 2.13's exporter about nothing that matters here: input and mask share their
# axis names, the poly-encoder's diagnostics (last_codes_stats) are set while tracing, pytree's API
EXPORT_NOISE = (r".*axis name", r".*assigned during export", r".*isinstance\(treespec")
# Short texts, and one longer than any truncation (over 512 word pieces), which each side cuts its own way
CHECK_TEXTS = (
    "hello there",
    "how was your weekend? we went hiking in the hills",
    "i like blue",
    "the train is late again\nwell, take the bus then",
    "we walked along the river and talked about the weather for hours " * 50,
)


class ExportError(ParlaiPolyError):
    """A model or an output folder that cannot be exported to, and what to do instead."""


# ---- the exports ---------------------------------------------------------------------------
def to_sentence_transformers(model_file: str, out_dir: str, side: str = "candidate", **options) -> Dict:
    """Write ``side`` of ``model_file`` as a sentence-transformers model directory at
    ``out_dir``; returns what it wrote in its ``parlai_poly_export.json`` (with the fidelity
    measured). ``options`` override the model file's, as in ``Ranker.load``."""
    if side not in SIDES:
        raise ExportError(f"side {side!r}: choose one of {', '.join(SIDES)}.")
    refuse_foreign(out_dir)  # before the minute an export can take
    ranker = load_exportable(model_file, options)
    model = ranker.agent.unwrapped_model
    if ranker.kind == "poly" and side == "context":
        raise ExportError(
            f"{model_file}: a poly-encoder's context side is m context vectors that each candidate "
            "attends over, not one embedding, and sentence-transformers has no module for that. "
            "Export its candidate side (--side candidate), or the whole poly-encoder, context "
            "scoring included, to ONNX (python -m parlai_poly.export onnx MODEL OUT_DIR)."
        )
    if model.pooling.reduction not in ST_POOLING:
        raise ExportError(
            f"{model_file}: --reduction-type {model.pooling.reduction} has no sentence-transformers "
            f"Pooling mode (it has {', '.join(ST_POOLING)}). Export it to ONNX instead."
        )
    encoder = side_encoder(model, side)
    max_length = ranker.agent.label_truncate if side == "candidate" else ranker.agent.text_truncate
    with staging(out_dir) as staged:
        with _scratch_dir(staged) as backbone_dir:
            save_backbone(encoder, ranker.agent.dict.tokenizer, backbone_dir)
            sentence_transformer(model, encoder, side, max_length, backbone_dir).save(staged)
        manifest = {
            **_manifest_head(ranker, model_file, "sentence-transformers"),
            "side": side,
            "max_seq_length": max_length,
            "truncation": ST_TRUNCATION[side + ("-parlai" if parlai_cut(ranker, side) else "")],
            "pooling": ST_POOLING[model.pooling.reduction],
            "similarity": "dot",
            "trained_similarity": _trained_similarity(model),
            "fidelity": check_sentence_transformer(ranker, staged, side, max_length),
        }
        write_manifest(staged, manifest)
    return manifest


def to_onnx(model_file: str, out_dir: str, **options) -> Dict:
    """Write both sides of a bi- or poly-encoder as ONNX graphs, with their tokenizer and
    ``parlai_poly_export.json``, at ``out_dir``; returns that manifest (fidelity included)."""
    refuse_foreign(out_dir)
    ranker = load_exportable(model_file, options)
    agent, model = ranker.agent, ranker.agent.unwrapped_model
    with staging(out_dir) as staged:
        tokenizer = copy.copy(agent.dict.tokenizer)
        tokenizer.model_max_length = model.context_encoder.max_positions  # the dictionary's is 'unlimited'
        tokenizer.save_pretrained(staged)
        manifest = {**_manifest_head(ranker, model_file, "onnx"), **onnx_layout(ranker)}
        write_manifest(staged, manifest)  # OnnxRanker reads it: the graphs are checked as a server runs them
        export_graphs(ranker, staged, manifest)
        manifest["fidelity"] = check_onnx(ranker, staged)
        write_manifest(staged, manifest)
    return manifest


# ---- what can be exported ------------------------------------------------------------------
def load_exportable(model_file: str, options: Dict):
    """``Ranker.load(model_file)`` in float32 (exports are float32, and checked against it),
    refused with a reason for what no export can reproduce."""
    from .api import Ranker

    if model_file.startswith("zoo:") and options.get("datapath"):
        from parlai.core.build_data import modelzoo_path

        # ParlAI's create_agent_from_model_file looks zoo: paths up under its own datapath
        model_file = modelzoo_path(options["datapath"], model_file)
    ranker = Ranker.load(model_file, **dict(options, precision="fp32"))
    opt = ranker.agent.opt
    if ranker.kind == "cross":
        raise ExportError(
            f"{model_file}: a cross-encoder reads each candidate together with its context, so it "
            "has no context or candidate encoder to export. Rank with it from Python "
            "(parlai_poly.Ranker) or parlai eval_model; export a bi- or poly-encoder."
        )
    if opt.get("parlai_dictionary") or opt.get("hf_config"):
        raise ExportError(
            f"{model_file}: a model migrated from ParlAI's own agents tokenizes with ParlAI's "
            "dictionary and has no Hugging Face backbone directory, which both exports need. "
            "Export a model trained on a Hugging Face backbone (--hf-model)."
        )
    for name in CONTEXT_LAYOUT_OPTIONS:
        if opt.get(name):
            raise ExportError(
                f"{model_file}: --{name.replace('_', '-')} {opt[name]} changes how a context becomes "
                "tokens, and exports read contexts as plain text ([CLS] text [SEP]). Export a "
                "model trained without it."
            )
    return ranker


def side_encoder(model: nn.Module, side: str):
    """The TextEncoder of ``side``: candidates have their own only with --share-encoders false."""
    if side == "candidate" and model.candidate_encoder is not None:
        return model.candidate_encoder
    return model.context_encoder


# ---- sentence-transformers -----------------------------------------------------------------
def save_backbone(encoder, tokenizer, path: str) -> None:
    """``encoder``'s Hugging Face model and ``tokenizer`` as a directory AutoModel loads.

    Our backbones have no pooler (we pool ourselves); the directory gets one of zeros, so that
    loading it reports no missing weights, and a stray ``pooler_output`` is plainly unused."""
    from transformers import AutoModel

    backbone = encoder.backbone
    full = AutoModel.from_config(backbone.config)
    missing, unexpected = full.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any(not name.startswith("pooler.") for name in missing):
        raise ExportError(
            f"the backbone's weights do not fit a fresh {type(full).__name__} (missing {missing}, "
            f"unexpected {unexpected}), so it cannot be saved as a Hugging Face model directory."
        )
    with torch.no_grad():
        for name in missing:
            full.get_parameter(name).zero_()
    full.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _trained_similarity(model: nn.Module) -> str:
    """What the model's dot product of the exported embeddings is (for the manifests)."""
    if model.similarity == "dot":
        return "dot product of the pooled vectors"
    return f"cosine x {model.similarity_scale:g}: candidates are unit vectors, contexts {model.similarity_scale:g} times one"


def sentence_transformer(model: nn.Module, encoder, side: str, max_length: int, backbone_dir: str):
    """The SentenceTransformer of ``side``: Transformer (truncating as our agents do), Pooling
    as ours, and the bi-encoder's candidate MLP as two Dense modules where it has one."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules  # version 6's home of models.*

    # contexts keep their latest tokens; the tokenizer saves the side with itself
    processor_kwargs = {"truncation_side": "left"} if side == "context" else {}
    transformer = modules.Transformer(backbone_dir, max_seq_length=max_length, processor_kwargs=processor_kwargs)
    layers = [transformer, modules.Pooling(encoder.dim, pooling_mode=ST_POOLING[model.pooling.reduction])]
    mlp = getattr(model, "candidate_mlp", None) if side == "candidate" else None
    if mlp is not None:
        for linear, activation in ((mlp[0], nn.ReLU()), (mlp[2], nn.Identity())):
            weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
            dense = modules.Dense(linear.in_features, linear.out_features, True, activation, weight, bias)
            layers.append(dense)
    if model.similarity == "cosine":  # unit vectors; the context's times the scale, as ours
        layers.append(modules.Normalize())
        if side == "context":
            scale = torch.eye(encoder.dim) * model.similarity_scale
            layers.append(modules.Dense(encoder.dim, encoder.dim, False, nn.Identity(), scale))
    return SentenceTransformer(modules=layers, similarity_fn_name="dot", device="cpu")


def check_sentence_transformer(ranker, path: str, side: str, max_length: int) -> Dict:
    """The largest difference between ``SentenceTransformer(path)``'s encodings of CHECK_TEXTS
    and ours; refused above TOLERANCE. On the candidate side of a model trained with ParlAI's
    cut, texts over ``max_length`` - 2 word pieces are cut otherwise there (see the module's
    docstring): measured apart, not held to it."""
    from sentence_transformers import SentenceTransformer

    texts = list(CHECK_TEXTS)
    theirs = SentenceTransformer(path, device="cpu").encode(texts, convert_to_numpy=True)
    ours = (ranker.encode(texts) if side == "candidate" else context_embeddings(ranker, texts)).numpy()
    diffs = np.abs(theirs - ours).max(axis=1)  # [texts]
    cut = [parlai_cut(ranker, side) and len(ranker.agent.dict.txt2vec(t)) > max_length - 2 for t in texts]
    kept = [d for d, c in zip(diffs, cut) if not c]
    fidelity = {"texts": len(kept), "max_abs_diff": _held_to_tolerance(max(kept), "sentence-transformers embeddings")}
    if any(cut):
        fidelity["cut_texts"] = int(sum(cut))
        fidelity["cut_texts_max_abs_diff"] = float(max(d for d, c in zip(diffs, cut) if c))
    return fidelity


def parlai_cut(ranker, side: str) -> bool:
    """Whether ``side``'s texts lose their end token when cut (ParlAI's cut: agents/base.py)."""
    return side == "candidate" and ranker.agent.opt.get("label_truncation") == "parlai"


# ---- ONNX ----------------------------------------------------------------------------------
class ExportGraph(nn.Module):
    """What an exported graph runs: our model module, reading a tokenizer's padding (attention
    mask 0) as our padding id, since our encoders find padding by id."""

    def __init__(self, model: nn.Module, pad_idx: int):
        super().__init__()
        self.model = model
        self.pad_idx = pad_idx

    def ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids.masked_fill(attention_mask == 0, self.pad_idx)


class CandidateGraph(ExportGraph):
    def forward(self, input_ids, attention_mask):
        """input_ids, attention_mask [N, L] -> embeddings [N, d]"""
        return self.model.encode_candidates(self.ids(input_ids, attention_mask))


class BiContextGraph(ExportGraph):
    def forward(self, input_ids, attention_mask):
        """input_ids, attention_mask [B, T] -> embeddings [B, d]"""
        return self.model.encode_context(self.ids(input_ids, attention_mask))


class PolyContextGraph(ExportGraph):
    def forward(self, input_ids, attention_mask, candidates):
        """input_ids, attention_mask [B, T], candidates [N, d] -> scores [B, N]"""
        context, mask = self.model.encode_context(self.ids(input_ids, attention_mask))  # [B, m, d], [B, m]
        return poly_scores(self.model, context, mask, candidates)


def poly_scores(model: nn.Module, context, context_mask, candidates) -> torch.Tensor:
    """``PolyEncoderModule.score`` in one piece, as a graph can hold it: no chunks (their number
    depends on N) and no test for padded context vectors (a branch on the data, which
    torch.export cannot trace); masking when nothing is padded changes no score."""
    attention = model.poly_attention
    if attention.kind != "multihead":
        return model._score_basic(context, context_mask, True, candidates)
    if _foldable(attention.mha):
        return model._score_multihead(model._multihead_terms(context), context_mask, True, candidates)
    return model._score_attended(context, context_mask, candidates)


def onnx_layout(ranker) -> Dict:
    """The manifest's description of both graphs and how their inputs are made."""
    agent = ranker.agent
    start, end = agent.dict.start_token, agent.dict.end_token
    ids = {"start_token_id": agent.START_IDX, "end_token_id": agent.END_IDX, "pad_token_id": agent.NULL_IDX}
    inputs = {"input_ids": "int64 [batch, tokens]", "attention_mask": "int64 [batch, tokens], 0 at padding"}
    candidate = {
        "graph": "candidate.onnx",
        "inputs": inputs,
        "outputs": {"embeddings": "float32 [batch, dim]"},
        "max_length": agent.label_truncate,
        **(
            {
                "keep": "start-parlai",
                "layout": f"{start} + word pieces + {end}, then the first {agent.label_truncate} ids (a "
                f"longer text loses its {end}: ParlAI's cut, which this model was trained with)",
            }
            if parlai_cut(ranker, "candidate")
            else {"keep": "start", "layout": f"{start} + the first {agent.label_truncate - 2} word pieces + {end}"}
        ),
        **ids,
    }
    context = {
        "graph": "context.onnx",
        "max_length": agent.text_truncate,
        "keep": "end",
        "layout": f"{start} + the last {agent.text_truncate - 2} word pieces + {end} (the latest turns kept)",
        **ids,
    }
    if ranker.kind == "bi":
        context.update(inputs=inputs, outputs={"embeddings": "float32 [batch, dim]"})
        score = "dot product of context.onnx's and candidate.onnx's embeddings"
    else:
        context.update(
            inputs={**inputs, "candidates": "float32 [candidates, dim]: candidate.onnx's embeddings"},
            outputs={"scores": "float32 [batch, candidates]"},
        )
        score = "context.onnx's scores (the poly-encoder's attention is in the graph)"
    return {
        "tokenizer": "tokenizer.json here (tokenizers.Tokenizer.from_file): ids without special tokens, "
        "then laid out as each side's 'layout' says",
        "dim": ranker.agent.unwrapped_model.context_encoder.dim,
        "dtype": "float32",
        "opset": OPSET,
        "pooling": ranker.agent.unwrapped_model.pooling.reduction,
        "trained_similarity": _trained_similarity(ranker.agent.unwrapped_model),
        "score": score,
        "candidate": candidate,
        "context": context,
    }


def export_graphs(ranker, folder: str, manifest: Dict) -> None:
    """candidate.onnx and context.onnx into ``folder``, traced on CHECK_TEXTS' ids with the
    batch, token and candidate axes dynamic."""
    from tokenizers import Tokenizer

    agent, model = ranker.agent, ranker.agent.unwrapped_model
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    batch, candidates = torch.export.Dim("batch"), torch.export.Dim("candidates")
    with _eval_mode(model):
        for side in SIDES:
            layout = manifest[side]
            tokens = torch.export.Dim("tokens", max=layout["max_length"])
            inputs = {k: torch.from_numpy(v) for k, v in token_ids(tokenizer, CHECK_TEXTS, layout).items()}
            dynamic = {name: {0: batch, 1: tokens} for name in inputs}
            if side == "candidate":
                graph = CandidateGraph(model, agent.NULL_IDX)
            elif ranker.kind == "bi":
                graph = BiContextGraph(model, agent.NULL_IDX)
            else:
                graph = PolyContextGraph(model, agent.NULL_IDX)
                inputs["candidates"] = ranker.encode(CHECK_TEXTS)
                dynamic["candidates"] = {0: candidates}
            _export_graph(graph, inputs, dynamic, list(layout["outputs"]), os.path.join(folder, layout["graph"]))


def _export_graph(graph: nn.Module, inputs: Dict, dynamic: Dict, output_names: List[str], path: str) -> None:
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    with warnings.catch_warnings():
        for message in EXPORT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(
            graph.eval(),
            tuple(inputs.values()),
            path,
            dynamo=True,  # torch.export: the supported exporter (TorchScript's is deprecated)
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=output_names,
            dynamic_shapes=dynamic,
            external_data=weight_bytes > SINGLE_FILE_BYTES,
            verbose=False,
        )


def check_onnx(ranker, folder: str) -> Dict:
    """The largest differences between the graphs under onnxruntime (inputs made by
    ``token_ids`` from the saved tokenizer) and ours on CHECK_TEXTS; refused above TOLERANCE."""
    onnx = OnnxRanker(folder)
    texts = list(CHECK_TEXTS)
    ours = ranker.encode(texts)  # [N, d]
    diff = _max_diff(onnx.encode(texts), ours)
    fidelity = {"texts": len(texts), "candidate_max_abs_diff": _held_to_tolerance(diff, "ONNX candidate embeddings")}
    if ranker.kind == "bi":
        diff = _max_diff(onnx.encode_context(texts), context_embeddings(ranker, texts))
        fidelity["context_max_abs_diff"] = _held_to_tolerance(diff, "ONNX context embeddings")
    else:
        diff = _max_diff(onnx.score(texts, ours.numpy()), context_scores(ranker, texts, ours))
        fidelity["score_max_abs_diff"] = _held_to_tolerance(diff, "ONNX poly-encoder scores")
    return fidelity


# ---- running the ONNX export: what a server needs ------------------------------------------
def token_ids(tokenizer, texts: Sequence[str], layout: Dict) -> Dict[str, np.ndarray]:
    """input_ids and attention_mask (int64 [N, L], right-padded) of ``texts`` laid out as our
    agents lay them out; ``tokenizer``: a ``tokenizers.Tokenizer`` (the export's tokenizer.json),
    ``layout``: the manifest's ``candidate`` or ``context`` entry."""
    return _padded(_laid_out(tokenizer, texts, layout), layout["pad_token_id"])


def _laid_out(tokenizer, texts: Sequence[str], layout: Dict) -> List[List[int]]:
    """Each text's ids, with the start and end tokens, cut as ``layout`` says."""
    start, end, length = layout["start_token_id"], layout["end_token_id"], layout["max_length"]
    rows = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        body = encoding.ids
        if layout["keep"] == "end":  # contexts: the latest word pieces, with room for both tokens
            rows.append([start] + body[max(0, len(body) - (length - 2)) :] + [end])
        elif layout["keep"] == "start":  # candidates: the first word pieces, with room for both
            rows.append([start] + body[: length - 2] + [end])
        elif layout["keep"] == "start-parlai":  # models trained with ParlAI's cut: wrapped, then cut
            rows.append(([start] + body + [end])[:length])
        else:
            raise ExportError(f"layout keep {layout['keep']!r}: this version reads end, start and start-parlai.")
    return rows


def _padded(rows: List[List[int]], pad_id: int) -> Dict[str, np.ndarray]:
    ids = np.full((len(rows), max(map(len, rows))), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class OnnxRanker:
    """An ONNX export run as a server would run it: tokenizers for the ids, onnxruntime for the
    graphs, numpy for a bi-encoder's dot products; neither torch nor ParlAI."""

    def __init__(self, export_dir: str, threads: int = 0, spinning: bool = True):
        import onnxruntime
        from tokenizers import Tokenizer

        self.manifest = read_manifest(export_dir)
        if self.manifest.get("export") != "onnx":
            raise ExportError(f"{export_dir}: a {self.manifest.get('export')} export, not an ONNX one.")
        self.kind = self.manifest["agent"]
        self.tokenizer = Tokenizer.from_file(os.path.join(export_dir, "tokenizer.json"))
        self.tokenizer.no_truncation()  # ids are cut by token_ids, each side its own way
        self.tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
        # idle threads spin for the next call: faster on a machine of its own, slower on a busy one
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.sessions = {
            side: onnxruntime.InferenceSession(
                os.path.join(export_dir, self.manifest[side]["graph"]), options, providers=["CPUExecutionProvider"]
            )
            for side in SIDES
        }

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Candidate embeddings [N, d] of ``texts``, in their order; encoded ``batch_size`` at a
        time in order of length, so that batches pad little (as our agents and
        sentence-transformers do)."""
        layout = self.manifest["candidate"]
        rows = _laid_out(self.tokenizer, texts, layout)
        order = np.argsort([len(row) for row in rows], kind="stable")
        out = np.empty((len(rows), self.manifest["dim"]), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            chosen = order[start : start + batch_size]
            feeds = _padded([rows[i] for i in chosen], layout["pad_token_id"])
            out[chosen] = self.sessions["candidate"].run(None, feeds)[0]
        return out

    def encode_context(self, texts: Sequence[str]) -> np.ndarray:
        """A bi-encoder's context embeddings [B, d]."""
        if self.kind != "bi":
            raise ExportError("a poly-encoder's context is no single embedding: use score(contexts, candidates).")
        return self._run("context", texts)

    def score(self, contexts: Sequence[str], candidates: np.ndarray) -> np.ndarray:
        """Scores [B, N] of ``contexts`` against candidate embeddings [N, d] (``encode``'s)."""
        if self.kind == "bi":
            return self.encode_context(contexts) @ candidates.T
        return self._run("context", contexts, candidates=candidates.astype(np.float32, copy=False))

    def _run(self, side: str, texts: Sequence[str], **extra) -> np.ndarray:
        feeds = {**token_ids(self.tokenizer, texts, self.manifest[side]), **extra}
        return self.sessions[side].run(None, feeds)[0]


# ---- ours, for contexts: the reference every export is checked against ---------------------
def context_ids(ranker, texts: Sequence[str]) -> torch.Tensor:
    """Contexts [B, T] as our agent reads them (history, truncation, [CLS] and [SEP]), padded."""
    from parlai.utils.torch import padded_tensor

    agent = ranker.agent
    vecs = []
    for text in texts:
        agent.reset()
        vecs.append(agent.observe({"text": text, "episode_done": True})["text_vec"])
    agent.reset()
    return padded_tensor(vecs, pad_idx=agent.NULL_IDX)[0]


@torch.no_grad()
def context_embeddings(ranker, texts: Sequence[str]) -> torch.Tensor:
    """A bi-encoder's context embeddings [B, d], float32."""
    model = ranker.agent.unwrapped_model
    with _eval_mode(model):
        return model.encode_context(context_ids(ranker, texts))


@torch.no_grad()
def context_scores(ranker, texts: Sequence[str], candidates: torch.Tensor) -> torch.Tensor:
    """Our scores [B, N] of contexts ``texts`` against encoded candidates [N, d]
    (``Ranker.encode``'s), as the agent scores cached candidates."""
    model = ranker.agent.unwrapped_model
    with _eval_mode(model):
        return ranker.agent.score_encoded(model.encode_context(context_ids(ranker, texts)), candidates)


# ---- manifests and staged folders ----------------------------------------------------------
def _manifest_head(ranker, model_file: str, export: str) -> Dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "export": export,
        "agent": ranker.kind,
        "model_file": model_file if model_file.startswith("zoo:") else os.path.abspath(model_file),
        "label_truncation": ranker.agent.opt.get("label_truncation"),  # as exported (options included)
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_manifest(folder: str, manifest: Dict) -> None:
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str) -> Dict:
    """The manifest of an export of ours in ``folder``; ExportError for anything else."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder}: not an export of ours ({MANIFEST}: {e.__class__.__name__}: {e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{folder}: not an export of ours ({MANIFEST} is not a {FORMAT} manifest).")
    if manifest.get("version") == 1 and manifest.get("candidate", {}).get("keep") == "start":
        manifest["candidate"]["keep"] = "start-parlai"  # what version 1's "start" was
    return manifest


def is_ours(folder) -> bool:
    try:
        read_manifest(str(folder))
    except ExportError:
        return False
    return True


def foreign(folder) -> ExportError:
    return ExportError(
        f"{folder}: exists and is not an export of ours (no {MANIFEST} in it), so it is left as it "
        "is and nothing was written. Give a new or empty directory, or remove that one yourself."
    )


def refuse_foreign(out_dir: str) -> None:
    """Refuse at once an ``out_dir`` that ``replace_dir`` would refuse at the end."""
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise foreign(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_ours(out_dir):
        raise foreign(out_dir)


@contextlib.contextmanager
def staging(out_dir: str):
    """A new folder beside ``out_dir`` to write an export into; it replaces ``out_dir`` (absent,
    empty or an export of ours) when the block ends without error, and is removed either way."""
    target = os.path.abspath(out_dir)
    refuse_foreign(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staged = f"{target}.{secrets.token_hex(4)}.staged"
    os.mkdir(staged)
    try:
        yield staged
        _usual_modes(staged)
        replace_dir(staged, target, is_ours, foreign)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _usual_modes(folder: str) -> None:
    """Files as the umask makes them: transformers writes its weights 0600 (through mkstemp)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextlib.contextmanager
def _scratch_dir(staged: str):
    """A scratch folder inside ``staged``, removed when done (before ``staged`` is put in place)."""
    path = os.path.join(staged, ".scratch")
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _max_diff(theirs: np.ndarray, ours: torch.Tensor) -> float:
    return float(np.abs(np.asarray(theirs, dtype=np.float32) - ours.numpy()).max())


def _held_to_tolerance(diff: float, what: str) -> float:
    if not diff <= TOLERANCE:  # NaN fails too
        raise ExportError(
            f"the exported {what} differ from ours by {diff:.3g} (more than {TOLERANCE:g}) on the "
            "check texts, so nothing was written. Please report it with the model's .opt file."
        )
    return float(diff)


# ---- command line --------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parlai_poly.export",
        description=__doc__.split("\n\n")[0],
        epilog="Each export writes parlai_poly_export.json: what it is, how texts become ids, and "
        "how far its outputs are from the model's on check texts.",
    )
    parser.add_argument("format", choices=("sentence-transformers", "onnx"))
    parser.add_argument("model_file", help="a bi- or poly-encoder model file of ours, or a zoo: path")
    parser.add_argument("out_dir", help="a new or empty directory, or an earlier export of ours (replaced)")
    parser.add_argument("--side", choices=SIDES, default="candidate", help="sentence-transformers: which encoder")
    parser.add_argument("-dp", "--datapath", default=None, help="where zoo: models are installed")
    args = parser.parse_args(argv)
    options = {"datapath": os.path.abspath(args.datapath)} if args.datapath else {}
    try:
        if args.format == "onnx":
            manifest = to_onnx(args.model_file, args.out_dir, **options)
        else:
            manifest = to_sentence_transformers(args.model_file, args.out_dir, args.side, **options)
    except ParlaiPolyError as e:
        print(f"parlai-poly: error: {e}", file=sys.stderr)
        return 2
    fidelity = ", ".join(
        f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in manifest["fidelity"].items()
    )
    print(f"Wrote {args.out_dir}: {args.format} export of a {manifest['agent']}-encoder ({fidelity}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
