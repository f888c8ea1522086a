"""Mixed precision: which dtype the backbone's matrix products run in (``--precision``).

Only the transformer runs under autocast (``TextEncoder``): its outputs come back as
float32, so pooling, the codes' attention, scores, softmaxes and losses stay float32, and
the weights the optimizer updates are float32 whatever the setting (autocast casts copies).

- ``fp32``: no autocast.
- ``bf16``: bfloat16 autocast, on CPU or CUDA. On a CPU with AMX or AVX512-BF16 a MiniLM
  training step runs 1.6-1.7x faster than in float32; on a CPU without them torch emulates
  bfloat16 and it is slower.
- ``fp16``: float16 autocast, CUDA only, with dynamic loss scaling (``LossScaler``), since
  float16 gradients underflow where bfloat16's do not.
- ``auto`` (default): ``bf16`` where the hardware has bfloat16 matrix units (a CPU with AMX or
  AVX512-BF16, a CUDA device that supports bfloat16), ``fp32`` elsewhere.
"""
import contextlib
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
