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


def architecture_option_names() -> Tuple[str, ...]:
    """Every option any config reads: the options that shape a model file's weights."""
    from . import bi_encoder, cross_encoder, poly_encoder  # noqa: F401 (each registers its kind)

    return tuple(sorted({name for cls in KINDS.values() for name in cls.option_names()}))
