"""Mixed precision: which dtype the backbone's matrix products run in (``--precision``).

Only the transformer runs in the lower precision (``TextEncoder``): its outputs come back as
float32, so pooling, the codes' attention, scores, softmaxes and losses stay float32, and
the weights the optimizer updates are float32 whatever the setting. Training runs it under
autocast (which casts copies); without gradients it runs on a copy of its weights in that
dtype, made again when they change (faster on a CPU: no casts per call, no float32 layer norms).

- ``fp32``: no autocast.
- ``bf16``: bfloat16 autocast, on CPU or CUDA. On a CPU with AMX or AVX512-BF16 a MiniLM
  training step runs 1.6-1.7x faster than in float32; on a CPU without them torch emulates
  bfloat16 and it is slower.
- ``fp16``: float16 autocast, CUDA only, with dynamic loss scaling (``LossScaler``), since
  float16 gradients underflow where bfloat16's do not.
- ``auto`` (default): ``bf16`` where the hardware has bfloat16 matrix units (a CPU with AMX or
  AVX512-BF16, a CUDA device that supports bfloat16), ``fp32`` elsewhere.

Also here: how cached fixed candidates are kept for scoring (``--candidate-store-dtype``,
``resolve_store_dtype``): float32, bfloat16 or int8; ``auto`` is bfloat16 from
``BF16_AUTO_MIN_CANDIDATES`` candidates on a CPU with bfloat16 instructions, float32 elsewhere.
"""
import contextlib
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STORE_DTYPES = ("auto", "float32", "bfloat16", "int8")
# auto turns cached candidates to bfloat16 from this many: below it their products cost less
# than encoding the context (poly-64, d=384: 10k candidates are ~12 ms of products, a 32-token
# MiniLM context ~30 ms), and scores stay exactly float32's
BF16_AUTO_MIN_CANDIDATES = 10000


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot products (AVX512-BF16 or AMX): elsewhere torch
    emulates them, and bfloat16 products can be slower than float32 ones."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve(setting: str, use_cuda: bool) -> str:
    """``setting`` with ``auto`` replaced by what this hardware runs best: 'fp32'|'bf16'|'fp16'.

    Raises ValueError, naming the option, for a setting this hardware cannot run.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"--precision {setting}: choose one of {', '.join(PRECISIONS)}.")
    if setting == "auto":
        if use_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if native_bfloat16() else "fp32"
    if setting == "fp16" and not use_cuda:
        raise ValueError(
            "--precision fp16: float16 autocast needs a CUDA device (on CPU torch emulates it, "
            "slowly). Use --precision bf16, or auto to pick what this machine runs best."
        )
    return setting


def bfloat16_pays(num_candidates: int, use_cuda: bool) -> bool:
    """Whether scoring ``num_candidates`` cached candidates in bfloat16 pays: enough of them,
    on a CPU with native bfloat16 dot products (elsewhere torch emulates them)."""
    return num_candidates >= BF16_AUTO_MIN_CANDIDATES and not use_cuda and native_bfloat16()


def resolve_store_dtype(setting: str, use_cuda: bool, num_candidates: int) -> str:
    """--candidate-store-dtype with auto decided: 'float32', 'bfloat16' or 'int8'.

    auto is bfloat16 where it pays (``bfloat16_pays``), else float32; int8 is only ever
    asked for (it changes scores more: the agents rescore the top K in float32 either way).
    Raises ValueError, naming the option, for an unknown setting.
    """
    if setting not in STORE_DTYPES:
        raise ValueError(f"--candidate-store-dtype {setting}: choose one of {', '.join(STORE_DTYPES)}.")
    if setting == "auto":
        return "bfloat16" if bfloat16_pays(num_candidates, use_cuda) else "float32"
    return setting


def compute_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision; None for float32 (no autocast)."""
    return DTYPES[precision]


def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """A torch.autocast context for ``dtype``, or a no-op for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling for float16 training: gradients of the loss times ``scale`` stay
    representable; a step whose gradients overflow is skipped and the scale halved; after
    ``growth_interval`` good steps it doubles. torch.amp.GradScaler's rule, applied around an
    optimizer step that the caller takes (ParlAI's update_params does the clipping and the
    scheduler as well)."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale = scale
        self.growth_interval = growth_interval
        self._good_steps = 0

    def unscale(self, parameters) -> bool:
        """Divide the gradients by the scale; True when all are finite (the step may go)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            for g in grads:
                g.div_(self.scale)
        return finite

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale /= 2
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale *= 2
            self._good_steps = 0
