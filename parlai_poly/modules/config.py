"""Architecture as data: what shapes a model's weights and scores, one dataclass per kind.

Field names are the agents' option names (``--poly-n-codes`` is ``poly_n_codes``), so a
config reads from a ParlAI opt (``from_opt``) and the agents save it, whole, in their model
files' options (``architecture``); ``modules.build_module(config, encoder)`` builds the model
from it for the agents, migration, the benchmarks and the distillation loop alike. A config
checks itself when made: a bad value raises ValueError naming the option, which the agents
turn into the command line's error.
"""
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Dict, Tuple, Type

from .pooling import REDUCTIONS

KINDS: Dict[str, Type["ModelConfig"]] = {}


@dataclass
class ModelConfig:
    kind: ClassVar[str] = ""
    reduction_type: str = "mean"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            KINDS[cls.kind] = cls

    def __post_init__(self):
        if self.reduction_type not in REDUCTIONS:
            raise ValueError(f"--reduction-type {self.reduction_type}: choose one of {REDUCTIONS}")

    @classmethod
    def from_opt(cls, opt) -> "ModelConfig":
        """The config of an opt's (or any dict's) options of the same names; absent or None
        ones take the defaults."""
        return cls(**{f.name: opt[f.name] for f in fields(cls) if opt.get(f.name) is not None})

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> Dict:
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(data: Dict) -> "ModelConfig":
        """What ``to_dict`` wrote (a model file's ``architecture``) back as a config."""
        kind = data.get("kind")
        if kind not in KINDS:
            raise ValueError(f"architecture kind {kind!r}: expected one of {sorted(KINDS)}")
        return KINDS[kind](**{k: v for k, v in data.items() if k != "kind"})


SIMILARITIES = ("dot", "cosine")


@dataclass
class DualEncoderConfig(ModelConfig):
    """What bi- and poly-encoders share: pooling, one encoder or two, and the similarity.

    similarity dot: the dot product of the vectors as pooled (the Poly-encoder paper's).
    cosine: of unit vectors, times ``similarity_scale`` (sentence-transformers' MNRL: 20), so
    a softmax over a batch's scores is as sharp as it needs to be; the scale is put on the
    context side (``DualEncoderModule.to_similarity_space``), so every dot-product path scores
    it unchanged and cached candidates are unit vectors.
    """

    reduction_first_m: int = 16
    share_encoders: bool = True
    similarity: str = "dot"
    similarity_scale: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"--similarity {self.similarity}: choose one of {SIMILARITIES}")
        if not self.similarity_scale > 0:
            raise ValueError(f"--similarity-scale {self.similarity_scale}: give a positive scale (MNRL's is 20).")


def architecture_option_names() -> Tuple[str, ...]:
    """Every option any config reads: the options that shape a model file's weights."""
    from . import bi_encoder, cross_encoder, poly_encoder  # noqa: F401 (each registers its kind)

    return tuple(sorted({name for cls in KINDS.values() for name in cls.option_names()}))
