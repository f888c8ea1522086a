"""Convert a model file of ParlAI's own transformer agents into one of ours.

    python -m parlai_poly.migrate PARLAI_MODEL_FILE OUT_MODEL_FILE

reads a model file written by ParlAI's ``transformer/biencoder``, ``transformer/polyencoder``
or ``transformer/crossencoder`` (the pretrained_transformers zoo models are such files), its
JSON ``.opt`` and its ``.dict`` (and ``.dict.codecs``) files, and writes a model file for
``parlai_poly.agents:bi``, ``:poly`` or ``:cross`` that scores the same inputs the same way.

ParlAI's model files are torch pickles: they are read only with torch's weights-only loader,
which builds tensors and plain containers and nothing else. What is written is ours: weights
as safetensors, options as JSON, the dictionary as ParlAI's own text files.

How ParlAI's TransformerEncoder (parlai/agents/transformer/modules/encoder.py) maps onto a
Hugging Face BertModel, exactly:
- layers: attention q/k/v/out_lin -> query/key/value/output.dense, norm1 -> attention LayerNorm,
  ffn lin1/lin2 -> intermediate/output dense, norm2 -> output LayerNorm; both are post-LN
  with eps 1e-5, and both scale queries by 1/sqrt(head size);
- embeddings: --embeddings-scale multiplies the word embeddings by sqrt(d) (folded into
  them); positions (learned or sinusoidal, a weight either way) count real tokens from 0,
  as BERT's do for right-padded rows; --n-segments 0 means no segment embeddings (a zero
  token-type row); variant xlm/bart put a LayerNorm on the embeddings as BERT does, and
  aiayn has none (the config's ``embedding_layer_norm: false`` drops BERT's);
- --output-scaling s multiplies the outputs, so it is folded into the last LayerNorm;
- --activation relu/gelu are BERT's relu/gelu (torch's erf GELU both).

Refused, with the option named: --variant prelayernorm (pre-LN layers are not BERT's),
--reduction-type max (ParlAI's max counts padding positions as zeros, so its scores depend
on how inputs were batched), a bi-encoder's --use-memories and --normalize-sent-emb, and
tokenizers whose files live outside the model file (gpt2, bytelevelbpe).
"""
import argparse
import json
import math
import os
import re
import sys
from typing import Dict, Optional, Tuple

import torch

from .errors import ModelFileError, ParlaiPolyError
from .model_file import is_safetensors, save_weights
from .storage import atomic_write, atomic_write_text

AGENTS = {"transformer/biencoder": "bi", "transformer/polyencoder": "poly", "transformer/crossencoder": "cross"}

# ParlAI 1.7.2's defaults (transformer.py, polyencoder.py) for options an old .opt may lack
PARLAI_DEFAULTS = {
    "variant": "aiayn",
    "activation": "relu",
    "embeddings_scale": True,
    "output_scaling": 1.0,
    "n_heads": 2,
    "reduction_type": "mean",
    "share_encoders": True,
    "normalize_sent_emb": False,
    "use_memories": False,
    "truncate": 1024,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "polyencoder_type": "codes",
    "poly_n_codes": 64,
    "poly_attention_type": "basic",
    "poly_attention_num_heads": 4,
    "codes_attention_type": "basic",
    "codes_attention_num_heads": 4,
    "dict_tokenizer": "re",
}
LAYER_NORM_EPS = 1e-5  # parlai/agents/transformer/modules/constants.py
# how ParlAI's tokens become text: copied so that ids stay those the weights were trained on
TOKENIZATION_OPTS = (
    "special_tok_lst",
    "person_tokens",
    "add_p1_after_newln",
    "history_size",
    "delimiter",
    "split_lines",
    "history_add_global_end_token",
    "history_reversed",
)
EXTERNAL_TOKENIZERS = ("gpt2", "bytelevelbpe", "slow_bytelevel_bpe")
# the same options in ParlAI's transformer/polyencoder and ours
POLY_OPTS = (
    "polyencoder_type",
    "poly_n_codes",
    "codes_attention_type",
    "codes_attention_num_heads",
    "poly_attention_type",
    "poly_attention_num_heads",
)
# ParlAI encoder layer -> BertLayer names
LAYER_NAMES = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "norm2": "output.LayerNorm",
}


def migrate(in_path: str, out_path: str) -> str:
    """Write our model file ``out_path`` from ParlAI's ``in_path``; returns our agent's name."""
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise ModelFileError(f"{out_path}: write the migrated model to a new path, not over ParlAI's.")
    popt = read_parlai_opt(in_path)
    kind = agent_kind(in_path, popt)
    check_supported(in_path, popt, kind)
    dict_text, codecs_text = read_dictionary(in_path, popt)
    weights = read_parlai_weights(in_path)
    state, settings, config = CONVERTERS[kind](weights, popt, set())
    module = build_module(kind, config, settings)
    try:  # every weight in its place, with its shape, before anything is written
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(
            f"{in_path}: its weights do not make a {kind} model ({str(e).splitlines()[0]}...). "
            "Was it trained with options this migration does not know?"
        ) from e
    opt = our_opt(kind, popt, config, settings, out_path)
    atomic_write_text(out_path + ".dict", dict_text)
    if codecs_text is not None:
        atomic_write_text(out_path + ".dict.codecs", codecs_text)
    atomic_write(out_path + ".opt", opt.save)
    save_weights(out_path, module.state_dict(), kind)  # last: its presence means complete
    return kind


# ---- reading ParlAI's files ---------------------------------------------------------------
def read_parlai_opt(path: str) -> dict:
    optfile = path + ".opt"
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file {path} does not exist.")
    if not os.path.isfile(optfile):
        raise ModelFileError(
            f"{optfile} is missing: ParlAI writes it beside every model file, and the "
            "migration needs it to know the architecture. Copy it next to the model file."
        )
    try:
        with open(optfile, encoding="utf-8") as f:
            popt = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(
            f"{optfile} is not JSON ({e.__class__.__name__}); old ParlAI versions pickled it, "
            "and parlai-poly never unpickles. Load the model once with ParlAI 1.7.2 and save it "
            "again to get a JSON .opt."
        ) from e
    if not isinstance(popt, dict):
        raise ModelFileError(f"{optfile}: not a ParlAI options file (a JSON object).")
    return {**PARLAI_DEFAULTS, **popt}


def agent_kind(path: str, popt: dict) -> str:
    model = str(popt.get("model"))
    kind = AGENTS.get(model.split(":")[0])
    if kind is None:
        raise ModelFileError(
            f"{path} was written by ParlAI's '{model}' agent; only transformer/biencoder, "
            "transformer/polyencoder and transformer/crossencoder model files can be migrated."
        )
    return kind


def check_supported(path: str, popt: dict, kind: str) -> None:
    """Refuse what our agents cannot compute exactly, naming the option."""
    refused = []
    if popt["variant"] not in ("aiayn", "xlm", "bart"):
        refused.append(f"--variant {popt['variant']}: its pre-LayerNorm layers are not BERT's post-LayerNorm ones")
    if popt["reduction_type"] == "max":
        refused.append(
            "--reduction-type max: ParlAI's max counts padding positions as zeros, so its scores "
            "depend on how inputs were batched and cannot be reproduced"
        )
    if kind == "bi" and popt["use_memories"]:
        refused.append("--use-memories true: memories are not part of parlai-poly's bi-encoder")
    if kind == "bi" and popt["normalize_sent_emb"]:
        refused.append("--normalize-sent-emb true: parlai-poly's bi-encoder scores raw dot products")
    if popt["dict_tokenizer"] in EXTERNAL_TOKENIZERS:
        refused.append(
            f"--dict-tokenizer {popt['dict_tokenizer']}: it reads vocabulary files kept outside "
            "the model file"
        )
    if refused:
        raise ModelFileError(f"{path} cannot be migrated exactly: " + "; ".join(refused) + ".")


def read_dictionary(path: str, popt: dict) -> Tuple[str, Optional[str]]:
    """(.dict text, .dict.codecs text or None): ParlAI's dictionary beside its model file."""
    dict_file = path + ".dict"
    if not os.path.isfile(dict_file) and popt.get("dict_file") and os.path.isfile(popt["dict_file"]):
        dict_file = popt["dict_file"]
    codecs_file = dict_file + ".codecs"
    texts = []
    for name in (dict_file, codecs_file):
        if not os.path.isfile(name):
            texts.append(None)
            continue
        try:
            with open(name, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise ModelFileError(f"{name}: not a ParlAI dictionary file (not UTF-8 text).") from e
    if texts[0] is None:
        raise ModelFileError(f"{path}.dict is missing: the migrated model needs ParlAI's dictionary.")
    if popt["dict_tokenizer"] == "bpe" and texts[1] is None:
        raise ModelFileError(f"{codecs_file} is missing: --dict-tokenizer bpe needs its BPE codecs.")
    return texts[0], texts[1]


def read_parlai_weights(path: str) -> Dict[str, torch.Tensor]:
    """The ``model`` weights of ParlAI's states, read without unpickling any object."""
    if is_safetensors(path):
        raise ModelFileError(f"{path} is a safetensors file, not a ParlAI model file: nothing to migrate.")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds, from pickle, zipfile and its own checks
        raise ModelFileError(
            f"{path}: not readable as a ParlAI model file with torch's weights-only loader "
            f"({load_failure(e)}). parlai-poly "
            "never unpickles arbitrary objects. If this is a ParlAI model file you trust, save "
            "its weights alone: torch.save({'model': torch.load(FILE, weights_only=False)"
            "['model']}, NEW), copy FILE.opt and FILE.dict to NEW.opt and NEW.dict, and migrate NEW."
        ) from e
    model = states.get("model") if isinstance(states, dict) else None
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ModelFileError(f"{path}: no 'model' weights in it, so not a ParlAI model file.")
    return {k: v.float() for k, v in model.items()}


def load_failure(e: Exception) -> str:
    """What torch's weights-only unpickler met (else the start of its message), on one line."""
    flat = re.sub(r"\x1b\[[0-9;]*m|\s+", " ", str(e)).strip()  # one line, without torch's bold
    marker = "WeightsUnpickler error:"
    text = flat.split(marker, 1)[1].split(" Please ")[0].strip() if marker in flat else flat
    return f"{e.__class__.__name__}: {text[:160]}"


# ---- weights: ParlAI names and layouts -> ours ----------------------------------------------
def take(weights: Dict[str, torch.Tensor], used: set, name: str) -> torch.Tensor:
    if name not in weights:
        raise ModelFileError(f"ParlAI model file: weight '{name}' is missing; is the file complete?")
    used.add(name)
    return weights[name]


def encoder_weights(weights, popt, used, src: str, dst: str):
    """ParlAI TransformerEncoder ``src`` -> BertModel under ``dst``: (weights, config dict)."""
    out = embedding_weights(weights, popt, used, src)
    n_layers = len({k[len(src) :].split(".")[1] for k in weights if k.startswith(src + "layers.")})
    if n_layers < 1:
        raise ModelFileError(f"ParlAI model file: no transformer layers under '{src}'.")
    for i in range(n_layers):
        for theirs, ours in LAYER_NAMES.items():
            for p in ("weight", "bias"):
                out[f"encoder.layer.{i}.{ours}.{p}"] = take(weights, used, f"{src}layers.{i}.{theirs}.{p}")
    for p in ("weight", "bias"):  # s * LayerNorm(x) is LayerNorm(x) with weight and bias times s
        name = f"encoder.layer.{n_layers - 1}.output.LayerNorm.{p}"
        out[name] = out[name] * popt["output_scaling"]
    return {dst + k: v for k, v in out.items()}, bert_config(out, popt, n_layers)


def embedding_weights(weights, popt, used, src: str) -> Dict[str, torch.Tensor]:
    """Word, position, segment embeddings and their LayerNorm, under BertEmbeddings' names."""
    word = take(weights, used, src + "embeddings.weight")  # [V, d]
    dim = word.size(1)
    if popt["embeddings_scale"]:
        word = word * math.sqrt(dim)  # ParlAI multiplies the looked-up rows by sqrt(d)
    segments = weights.get(src + "segment_embeddings.weight")  # absent with --n-segments 0
    if segments is not None:
        used.add(src + "segment_embeddings.weight")
    out = {
        "embeddings.word_embeddings.weight": word,
        "embeddings.position_embeddings.weight": take(weights, used, src + "position_embeddings.weight"),
        "embeddings.token_type_embeddings.weight": word.new_zeros(1, dim) if segments is None else segments,
    }
    if popt["variant"] != "aiayn":  # xlm and bart normalize the embeddings, as BERT does
        for p in ("weight", "bias"):
            out[f"embeddings.LayerNorm.{p}"] = take(weights, used, f"{src}norm_embeddings.{p}")
    return out


def bert_config(out: Dict[str, torch.Tensor], popt: dict, n_layers: int) -> dict:
    """The BertConfig, as plain data for the .opt, of converted weights ``out``."""
    vocab, dim = out["embeddings.word_embeddings.weight"].shape
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab,
        "hidden_size": dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": popt["n_heads"],
        "intermediate_size": out["encoder.layer.0.intermediate.dense.weight"].size(0),
        "hidden_act": popt["activation"],
        "hidden_dropout_prob": popt["dropout"],
        "attention_probs_dropout_prob": popt["attention_dropout"],
        "max_position_embeddings": out["embeddings.position_embeddings.weight"].size(0),
        "type_vocab_size": out["embeddings.token_type_embeddings.weight"].size(0),
        "layer_norm_eps": LAYER_NORM_EPS,
        "embedding_layer_norm": "embeddings.LayerNorm.weight" in out,  # false: BERT's is dropped
    }


def attention_weights(weights, used, src: str, dst: str):
    """ParlAI MultiHeadAttention q/k/v/out_lin -> torch's nn.MultiheadAttention (packed)."""
    names = ("q_lin", "k_lin", "v_lin", "out_lin")
    lin = {n: [take(weights, used, f"{src}{n}.{p}") for p in ("weight", "bias")] for n in names}
    qkv = ("q_lin", "k_lin", "v_lin")
    return {
        dst + "in_proj_weight": torch.cat([lin[n][0] for n in qkv]),  # [3d, d]
        dst + "in_proj_bias": torch.cat([lin[n][1] for n in qkv]),  # [3d]
        dst + "out_proj.weight": lin["out_lin"][0],
        dst + "out_proj.bias": lin["out_lin"][1],
    }


def check_all_used(weights, used, ignored=()):
    left = sorted(k for k in weights if k not in used and not k.startswith(tuple(ignored)))
    if left:
        raise ModelFileError(
            f"ParlAI model file: weights {', '.join(left[:5])}{'...' if len(left) > 5 else ''} "
            "have no place in parlai-poly's model; it was trained with options this migration "
            "does not know, so it is not migrated rather than approximated."
        )


def convert_bi(weights, popt, used):
    """TransformerMemNetModel: context_encoder, and cand_encoder (or, with --share-encoders,
    TransformerResponseWrapper: the context encoder then a Linear-ReLU-Linear MLP)."""
    state, config = encoder_weights(weights, popt, used, "context_encoder.", "context_encoder.backbone.")
    shared = bool(popt["share_encoders"])
    if shared:
        for i in (0, 2):
            for p in ("weight", "bias"):
                state[f"candidate_mlp.{i}.{p}"] = take(weights, used, f"cand_encoder.mlp.{i}.{p}")
    else:
        state.update(encoder_weights(weights, popt, used, "cand_encoder.", "candidate_encoder.backbone.")[0])
    # the shared word embeddings appear again under the model, and so do the wrapped context
    # encoder and the (unused without --use-memories) memory encoder
    duplicates = ("embeddings.", "cand_embeddings.", "memory_transformer.", "cand_encoder.transformer.")
    check_all_used(weights, used, duplicates)
    settings = {"share_encoders": shared, "candidate_mlp": shared, "reduction_type": popt["reduction_type"]}
    return state, settings, config


def convert_poly(weights, popt, used):
    """PolyEncoderModule: encoder_ctxt, encoder_cand, codes, code_attention, attention."""
    state, config = encoder_weights(weights, popt, used, "encoder_ctxt.", "context_encoder.backbone.")
    state.update(encoder_weights(weights, popt, used, "encoder_cand.", "candidate_encoder.backbone.")[0])
    if popt["polyencoder_type"] == "codes":
        state["codes"] = take(weights, used, "codes")  # [m, d]
        if popt["codes_attention_type"] == "multihead":
            state.update(attention_weights(weights, used, "code_attention.", "codes_attention.mha."))
    if popt["poly_attention_type"] == "multihead":
        state.update(attention_weights(weights, used, "attention.", "poly_attention.mha."))
    check_all_used(weights, used)
    settings = {
        "share_encoders": False,  # ParlAI's poly-encoder always has two encoders
        "reduction_type": popt["reduction_type"],
        **{k: popt[k] for k in POLY_OPTS},
    }
    return state, settings, config


def convert_cross(weights, popt, used):
    """CrossEncoderModule: encoder (2 segments) and linear_layer."""
    state, config = encoder_weights(weights, popt, used, "encoder.", "encoder.backbone.")
    state["classifier.weight"] = take(weights, used, "linear_layer.weight")  # [1, d]
    state["classifier.bias"] = take(weights, used, "linear_layer.bias")
    check_all_used(weights, used)
    # ParlAI's concat_without_padding keeps the candidate's start token
    return state, {"reduction_type": popt["reduction_type"], "cross_candidate_start": True, "cross_head": "linear"}, config


CONVERTERS = {"bi": convert_bi, "poly": convert_poly, "cross": convert_cross}


def build_module(kind: str, config: dict, settings: dict) -> torch.nn.Module:
    """Our model module, built as the agent builds it, to check the converted weights fit."""
    from .backbone import load_encoder
    from .modules import TextEncoder, build_module
    from .modules.config import KINDS

    encoder = TextEncoder(load_encoder(None, pretrained=False, hf_config=config), pad_idx=0)
    return build_module(KINDS[kind].from_opt(settings), encoder)


# ---- options ---------------------------------------------------------------------------------
def truncations(popt: dict, n_positions: int) -> Tuple[int, int]:
    """Our (text_truncate, label_truncate) for ParlAI's.

    ParlAI truncates a context to text_truncate tokens and then adds start and end; ours
    counts both, hence + 2. Labels are truncated after start and end in both. Neither is
    left above the position count: ParlAI's own agent fails on longer inputs.
    """

    def parlai(name):  # as TorchAgent.__init__ reads them; negative means no truncation
        value = popt.get(name) or popt["truncate"]
        return None if value is None or value < 0 else value

    text, label = parlai("text_truncate"), parlai("label_truncate")
    text = n_positions if text is None else min(text + 2, n_positions)
    label = n_positions if label is None else min(label, n_positions)
    return text, label


def our_opt(kind: str, popt: dict, config: dict, settings: dict, out_path: str):
    """The full options of our agent, with the BERT config and ParlAI's tokenization."""
    from parlai.core.params import ParlaiParser

    from . import compat

    compat.apply()  # ParlAI 1.7.2's fixes, before ParlAI builds or parses anything

    text_truncate, label_truncate = truncations(popt, config["max_position_embeddings"])
    opt = ParlaiParser(True, True).parse_kwargs(
        model=f"parlai_poly.agents:{kind}", text_truncate=text_truncate, label_truncate=label_truncate, **settings
    )
    for key, value in popt.items():
        dictionary = key.startswith(("dict_", "bpe_")) and key not in ("dict_file", "dict_initpath")
        if dictionary or key in TOKENIZATION_OPTS:
            opt[key] = value
    opt["model_file"] = os.path.abspath(out_path)
    opt["dict_file"] = None  # ParlAI then reads MODEL.dict, wherever the files are moved
    opt["hf_config"] = config  # the backbone travels as data: there is no directory to point at
    opt["parlai_dictionary"] = True
    opt["migrated_from"] = popt.get("model")
    opt["label_truncation"] = "parlai"  # labels cut as ParlAI's agent cut them in training
    return opt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m parlai_poly.migrate",
        description=__doc__.split("\n\n")[0],
        epilog="The result loads with -mf OUT_MODEL_FILE in parlai eval_model, interactive, ...",
    )
    p.add_argument("parlai_model_file", help="by ParlAI's transformer/{biencoder,polyencoder,crossencoder}")
    p.add_argument("out_model_file", help="where to write the parlai-poly model file (and its .opt, .dict)")
    args = p.parse_args(argv)
    try:
        kind = migrate(args.parlai_model_file, args.out_model_file)
    except ParlaiPolyError as e:
        print(f"parlai-poly: error: {e}", file=sys.stderr)
        return 2
    out = args.out_model_file
    print(f"Wrote {out}: a parlai_poly.agents:{kind} model. Use it with -mf {out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
