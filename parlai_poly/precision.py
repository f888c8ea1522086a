"""Mixed precision: which dtype the backbone's matrix products run in (``--precision``).

Only the transformer runs in the lower precision (``TextEncoder``): its outputs come back as
float32, so pooling, the codes' attention, scores, softmaxes and losses stay float32, and
the weights the optimizer updates are float32 whatever the setting. Training runs it under
autocast (which casts copies); without gradients it runs on a copy of its weights in that
dtype, made again when they change (faster on a CPU: no casts per call, no float32 layer norms).

- ``fp32``: no autocast.
- ``bf16``: bfloat16 autocast, on CPU or CUDA. Where the CPU's bfloat16 units run at full
  speed (AMX, AVX512-BF16) a MiniLM training step has run 1.6-1.7x faster than in float32;
  on a CPU without them torch emulates bfloat16 and it is slower.
- ``bf16-full``: training runs the backbone wholly in bfloat16 (weights cast once per step,
  layer norms and residual stream bfloat16 too) instead of under autocast, as evaluation
  already runs it; the optimizer's weights stay float32. No autocast casts at every product:
  MiniLM training steps 1.03-1.14x faster than ``bf16`` on 2 cores (benchmarks/train_speed.py).
- ``fp16``: float16 autocast, CUDA only, with dynamic loss scaling (``LossScaler``), since
  float16 gradients underflow where bfloat16's do not.
- ``auto`` (default): ``bf16`` on a CUDA device that supports bfloat16; on a CPU, ``bf16-full``
  where a bfloat16 matrix product of a MiniLM layer's shape, timed on one core once per process
  (about 0.15 s), runs at least 1.1x faster than the float32 one (``bfloat16_products_pay``),
  ``fp32`` elsewhere. ``bf16-full`` rather than ``bf16`` on a CPU: level in accuracy (the
  ``ccc_bi`` recipe for 300 updates in each, paired on the whole CCC valid split: R@1/20
  -0.000 [-0.001, +0.000]) and faster; on CUDA only autocast has been measured. Having the
  instructions is not enough: this machine's virtual CPU shows AVX512-BF16 in every session,
  and the same oneDNN kernel has run its bfloat16 products at about 380 GFLOP/s on 2 cores in
  earlier sessions and at 157-166 on 2026-12-04, when float32's ran at 294-318: a bf16
  training step was then 0.66x float32's speed.

Also here: how cached fixed candidates are kept for scoring (``--candidate-store-dtype``,
``resolve_store_dtype``): float32, bfloat16 or int8; ``auto`` is bfloat16 from
``BF16_AUTO_MIN_CANDIDATES`` candidates on a CPU whose bfloat16 products are timed faster, as
for ``--precision auto``, float32 elsewhere: on this machine's CPU on a day its bfloat16
products ran no faster than float32's, a bfloat16 store scored the bi-encoder at 1M about as
fast as ParlAI's float32 one, and the poly-encoders slower than our float32 store (README,
"This machine is not the last run's").
"""
import contextlib
import functools
import time
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16", "bf16-full", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "bf16-full": torch.bfloat16, "fp16": torch.float16}
STORE_DTYPES = ("auto", "float32", "bfloat16", "int8")
# auto's timing: one MiniLM feed-forward product of a 16 x 32-token batch ([512, 384] @ [384,
# 1536], 0.6 GFLOP), the fastest of PRODUCT_REPEATS; bfloat16 must win by this factor, so a
# tie (timing noise) keeps float32's exact scores
PRODUCT_SHAPE = (512, 384, 1536)
PRODUCT_REPEATS = 7
BF16_MIN_SPEEDUP = 1.1
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


def product_seconds() -> dict:
    """{dtype: fastest seconds} of one ``PRODUCT_SHAPE`` matrix product in float32 and in
    bfloat16 on one core, the two alternating. One thread: what is timed is a core's speed,
    which another process busy on the other core barely moves. (With two threads one waits
    for the other: beside a training run, float32 timed 1.5x slower than bfloat16 here, where
    alone float32 is 1.8x faster.)"""
    m, k, n = PRODUCT_SHAPE
    operands = {
        dtype: (torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype))
        for dtype in (torch.float32, torch.bfloat16)
    }
    times = {dtype: [] for dtype in operands}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for repeat in range(PRODUCT_REPEATS + 2):  # the first two warm up oneDNN's kernels
            for dtype, (a, b) in operands.items():
                start = time.perf_counter()
                torch.mm(a, b)
                if repeat >= 2:
                    times[dtype].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {dtype: min(t) for dtype, t in times.items()}  # the least disturbed run


def bfloat16_products_pay() -> bool:
    """Whether bfloat16 matrix products run at least ``BF16_MIN_SPEEDUP`` times faster than
    float32 ones on this CPU: it has bfloat16 instructions (elsewhere torch emulates them)
    and its products, timed once per process, say so."""
    return native_bfloat16() and bfloat16_products_faster()  # no timing without the instructions


@functools.lru_cache(maxsize=None)
def bfloat16_products_faster() -> bool:
    """``product_seconds`` compared, once per process."""
    with torch.no_grad():
        seconds = product_seconds()
    return seconds[torch.float32] >= BF16_MIN_SPEEDUP * seconds[torch.bfloat16]


def resolve(setting: str, use_cuda: bool) -> str:
    """``setting`` with ``auto`` replaced by what this hardware runs best: 'fp32'|'bf16'|
    'bf16-full'|'fp16'.

    Raises ValueError, naming the option, for a setting this hardware cannot run.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"--precision {setting}: choose one of {', '.join(PRECISIONS)}.")
    if setting == "auto":
        if use_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        # on a CPU the whole backbone in bfloat16: autocast's level in accuracy, faster
        return "bf16-full" if bfloat16_products_pay() else "fp32"
    if setting == "fp16" and not use_cuda:
        raise ValueError(
            "--precision fp16: float16 autocast needs a CUDA device (on CPU torch emulates it, "
            "slowly). Use --precision bf16, or auto to pick what this machine runs best."
        )
    return setting


def bfloat16_pays(num_candidates: int, use_cuda: bool) -> bool:
    """Whether scoring ``num_candidates`` cached candidates in bfloat16 pays: enough of them,
    on a CPU whose bfloat16 products are timed faster (``bfloat16_products_pay``)."""
    return num_candidates >= BF16_AUTO_MIN_CANDIDATES and not use_cuda and bfloat16_products_pay()


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
