"""Cached candidate encodings in float32, bfloat16 or int8, and the fused pass that scores them.

Scoring a context against N cached candidates reads all N * d of their numbers every time;
at large N that read is the time (a bi-encoder at N = 1M, d = 384 reads 1.5 GB of float32).
bfloat16 halves what is read, int8 quarters it:

- bfloat16: each number rounded to 8 significant bits (relative error <= 2^-9).
- int8: each vector x [d] as q = round(x / s), s = max|x| / 127, q in [-127, 127], with its
  scale s kept in float32 (per-vector symmetric scales, as row-wise int8 weight quantization
  keeps them). Each number is off by at most s / 2, so a score c . x is off by at most
  s / 2 * sum|c| (``int8_error_bound``).

Where the ranking is read the agents score the top K again from float32 copies
(``rescore_top``), so the top of the ranking is float32's.

Fused pass. ``fused_dot`` scores a few contexts against the stored vectors in one pass that
converts each number to float32 in registers and multiplies it there: torch.compile turns
``(values.float() * context).sum(-1)`` into one loop, so the store is read once, nothing of
size [N, d] is ever written, and float32 accumulates the products (with an eager matrix
product the bfloat16 case rounds every score to bfloat16, and the int8 case would first
convert the store). Measured (500k candidates, d = 384, 1 thread, on a shared machine):
float32 37 ms against 100 ms for torch's matrix-vector product, bfloat16 20 ms, int8 15 ms
(its conversions, not its bytes, bound it on one thread); from about 16 contexts a matrix
product per chunk catches up (``FUSED_DOT_MAX_CONTEXTS``).

The fused passes run where no gradient is needed, from FUSED_MIN_CANDIDATES candidates
(``DualEncoderModule.fusing``). torch.compile needs a C++ compiler (inductor) and compiles on
first use (seconds, cached on disk). Where it fails the same function runs eagerly, with one warning
(``CompiledOrEager``); PARLAI_POLY_FUSED=0 in the environment turns compiling off.
"""
import functools
import os
import types
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

STORE_DTYPES = ("float32", "bfloat16", "int8")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_MAX = 127
# up to this many contexts, one fused pass over the store beats a matrix product per chunk of
# dequantized candidates (bfloat16 and int8, d = 384, 100k candidates, 1 thread, on a shared
# machine: fused 7 to 42 ms for 1 to 16 contexts, the chunked product 32 to 42 ms; at 32
# contexts 87 against 58 ms)
FUSED_DOT_MAX_CONTEXTS = 16
# the fused passes are taken by default from this many candidates: below it scoring costs less
# than encoding the context (10k candidates of poly-64 are ~12 ms of products, a 32-token MiniLM
# context ~30 ms), so compiling (seconds, once per process and signature) would not pay back
FUSED_MIN_CANDIDATES = 10000


def quantize_int8(encs: torch.Tensor):
    """encs [n, d] float -> (values [n, d] int8, scales [n] float32), per-vector symmetric.

    A zero vector gets scale 1 (any scale represents it exactly) rather than 0, so that
    dequantizing never divides by zero.
    """
    encs = encs.float()
    scales = encs.abs().amax(dim=-1) / INT8_MAX  # [n]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(encs / scales.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scales


def int8_error_bound(scales: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The largest error int8 storage can put in scores [B, N]: s_n / 2 * sum_j |c_bj|.

    scales [N] float32, context [B, d] -> [B, N]: each stored number is off by at most half
    its vector's scale, and a score sums d of them weighted by the context's numbers.
    """
    return 0.5 * context.abs().sum(-1, keepdim=True) * scales.unsqueeze(0)


class StoredCandidates:
    """N candidate encodings as a candidate store keeps them for scoring.

    ``values`` [N, d]: float32, bfloat16, or int8 with ``scales`` [N] float32 (``quantize``).
    Scoring reads them a chunk at a time (``rows``) or in one fused pass (``fused_dot``);
    neither converts the whole store.
    """

    def __init__(self, values: torch.Tensor, scales: Optional[torch.Tensor] = None):
        name = {v: k for k, v in TORCH_DTYPES.items()}.get(values.dtype)
        if name is None:
            raise ValueError(f"stored candidates in {values.dtype}: choose one of {STORE_DTYPES}")
        if (name == "int8") != (scales is not None):
            raise ValueError("int8 candidates need their per-vector scales, and only int8 ones have them")
        self.values, self.scales, self.dtype_name = values, scales, name

    @classmethod
    def quantize(cls, encs: torch.Tensor, dtype: str) -> "StoredCandidates":
        """encs [N, d] float32 kept as ``dtype`` ('float32', 'bfloat16' or 'int8')."""
        if dtype == "int8":
            return cls(*quantize_int8(encs))
        return cls(encs.to(TORCH_DTYPES[dtype]))

    def __len__(self) -> int:
        return self.values.size(0)

    @property
    def low_precision(self) -> bool:
        """bfloat16 or int8: scores carry rounding that the top-K rescoring repairs."""
        return self.dtype_name != "float32"

    @property
    def product_dtype(self) -> torch.dtype:
        """The dtype ``rows`` gives: float32 for float32, bfloat16 for bfloat16 and int8."""
        return torch.float32 if self.dtype_name == "float32" else torch.bfloat16

    def rows(self, start: int, end: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Candidates start:end as (values [n, d] in ``product_dtype``, scales [n] or None).

        int8 values come as bfloat16, exactly (|q| <= 127 needs 7 bits), unscaled: a product
        with them runs at bfloat16's rate, and the caller multiplies each candidate's
        products by its scale (n * m numbers, not n * d; torch converts int8 to bfloat16 at
        memory speed but multiplies int8 by float32 an element at a time).
        """
        values = self.values[start:end]
        if self.scales is None:
            return values, None
        return values.to(torch.bfloat16), self.scales[start:end]

    def chunks(self, size: int, int8_as_stored: bool = False) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """(start, values, scales) of each ``size`` candidates in turn, as ``rows`` gives them,
        or with ``int8_as_stored`` int8 values as stored (for ``int8_product``).

        int8 values are converted into one bfloat16 buffer reused from chunk to chunk, so a
        chunk is valid only until the next is taken: a new tensor per chunk costs its page
        faults (50 ms for 131,072 x 384 on this project's CPU, against 6 ms to fill a buffer
        already in memory; about a fifth of an int8 poly-16 pass over 1M candidates).
        """
        if int8_as_stored and self.scales is not None:
            for start in range(0, max(len(self), 1), size):
                yield start, self.values[start : start + size], self.scales[start : start + size]
            return
        buffer = None
        if self.scales is not None:
            buffer = self.values.new_empty((min(size, len(self)), self.values.size(1)), dtype=torch.bfloat16)
        for start in range(0, max(len(self), 1), size):  # N = 0: one empty chunk
            end = min(start + size, len(self))
            if buffer is None:
                yield (start, *self.rows(start, end))
            else:
                values = buffer[: end - start]
                values.copy_(self.values[start:end])  # exact: |q| <= 127 needs 7 bits
                yield start, values, self.scales[start:end]

    def dequantize(self, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """Candidates start:end [n, d] as float32 numbers (what the store's numbers stand for)."""
        values = self.values[start:end].float()
        if self.scales is None:
            return values
        return values * self.scales[start:end].unsqueeze(-1)

    def to(self, device) -> "StoredCandidates":
        scales = None if self.scales is None else self.scales.to(device)
        return StoredCandidates(self.values.to(device), scales)


Candidates = Union[torch.Tensor, StoredCandidates]


def num_candidates(candidates: Candidates) -> int:
    """N of candidates [N, d], [B, N, d] or stored ones."""
    return len(candidates) if isinstance(candidates, StoredCandidates) else candidates.size(-2)


def candidate_chunks(
    candidates: Candidates, size: int, int8_as_stored: bool = False
) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """(start, rows, int8 scales [n] or None) of each ``size`` candidates along N: rows [n, d]
    or [B, n, d]; stored ones in their product dtype (int8 ones as stored with
    ``int8_as_stored``), each valid until the next is taken (``StoredCandidates.chunks``)."""
    if isinstance(candidates, StoredCandidates):
        yield from candidates.chunks(size, int8_as_stored)
        return
    for start in range(0, max(candidates.size(-2), 1), size):  # N = 0: one empty chunk
        yield start, candidates[..., start : start + size, :], None


# ---- int8 products --------------------------------------------------------------------------
def takes_int8_products(candidates: Candidates, context: torch.Tensor) -> bool:
    """Whether stored int8 candidates are multiplied as int8 (``int8_product``): on CPU, where
    torch has an int8 matrix product, and never for a gradient."""
    stored_int8 = isinstance(candidates, StoredCandidates) and candidates.scales is not None
    if not stored_int8 or context.device.type != "cpu" or torch.is_grad_enabled():
        return False
    return _int8_matmul_runs()


@functools.lru_cache(maxsize=None)
def _int8_matmul_runs() -> bool:
    try:  # a private op of torch's (as torchao uses it): checked once, on a tiny case
        ones = torch.ones(2, 2, dtype=torch.int8)
        return bool((torch._int_mm(ones, ones) == 2).all())
    except (AttributeError, RuntimeError):
        return False


def quantize_contexts_int8(vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """vectors [B, k, d] float -> (q [d, B*k] int8, scales [B] float32): one scale per
    context for its k vectors (a poly-encoder's m, a bi-encoder's 1), so that the scale of an
    int8 product's similarity is its candidate's scale times its context's."""
    bsz, k, dim = vectors.shape
    values, scales = quantize_int8(vectors.reshape(bsz, k * dim))
    return values.view(bsz * k, dim).t(), scales


def int8_product(rows: torch.Tensor, context_q: torch.Tensor) -> torch.Tensor:
    """rows [n, d] int8 as stored, context_q [d, K] int8 -> similarities [n, K] int32, exact.

    Stored int8 candidates are multiplied as they are, without converting them to bfloat16
    first: on this project's CPU (AVX512 VNNI) the int8 product of a chunk of 8,192 x 384 by
    384 x 64 took 33 ms per 196,608 candidates against 45 ms for the bfloat16 one plus 10 ms
    of converting (1 thread, on a shared machine). The context's int8 rounding adds to the
    candidates' (``quantize_contexts_int8``); the top K rescored in float32 repairs both."""
    return torch._int_mm(rows, context_q)


# ---- compiled passes -----------------------------------------------------------------------
class CompiledOrEager:
    """``fn`` compiled by torch.compile (shapes dynamic) on first call; ``fn`` itself where
    compiling is turned off (PARLAI_POLY_FUSED=0) or fails, with one warning saying why.

    torch.compile keeps at most 8 compiled versions per function (its recompile_limit) and
    then runs it eagerly for good; every dtype of the inputs, an input given or None, and
    inference mode on or off is a version of its own. So each such signature gets its own
    copy of the function to compile (``_signature``), with its own 8 for sizes and
    constants, and no global setting of torch's is changed.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Dict[tuple, Callable] = {}
        self.failed: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.failed is None and os.environ.get("PARLAI_POLY_FUSED", "1") != "0"

    @staticmethod
    def _signature(args) -> tuple:
        kinds = tuple(a.dtype if isinstance(a, torch.Tensor) else a is None for a in args)
        return kinds + (torch.is_inference_mode_enabled(),)

    def __call__(self, *args):
        if not self.enabled:
            return self.fn(*args)
        try:
            return self._compiled_for(args)(*args)
        except Exception as e:  # no C++ compiler, an unsupported device, a torch bug
            result = self.fn(*args)  # raises again where the call itself is wrong, not compiling
            self._fail(e)
            return result

    def compiled_or_none(self, *args):
        """The compiled function's result, or None where compiling is off or fails (warned
        once), for a caller whose eager path is another one (``fn`` over all the candidates at
        once would allocate what the compiled pass never does). Its arguments are the caller's
        own making: any exception here is taken for a failure to compile."""
        if not self.enabled:
            return None
        try:
            return self._compiled_for(args)(*args)
        except Exception as e:
            self._fail(e)
            return None

    def _compiled_for(self, args) -> Callable:
        key = self._signature(args)
        compiled = self._compiled.get(key)
        if compiled is None:
            fn = self.fn
            code = fn.__code__.replace()  # a code object of its own: its own compile cache
            copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            compiled = self._compiled[key] = torch.compile(copy, dynamic=True)
        return compiled

    def _fail(self, error: Exception):
        self.failed = f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"torch.compile of {self.fn.__name__} failed ({self.failed}); scoring runs unfused.")


def dot_scores(values: torch.Tensor, scales: Optional[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
    """values [N, d] (any dtype), scales [N] or None, context [B, d] float32 -> scores [B, N].

    Written as a broadcast product and a sum so that torch.compile makes it one loop that
    reads each stored number once and accumulates in float32 (see the module docstring).
    """
    scores = (values.unsqueeze(1).float() * context.unsqueeze(0)).sum(-1)  # [N, B]
    if scales is not None:
        scores = scores * scales.unsqueeze(-1)
    return scores.t()


fused_dot = CompiledOrEager(dot_scores)


def rescore_top(scores: torch.Tensor, rescore: Callable, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, N] with each row's top ``k`` scored again by ``rescore(candidates[top])``
    and kept on top.

    ``rescore`` maps per-example candidates [B, k, d] to scores [B, k]: after a pass in
    bfloat16 or int8 over all N, the float32 candidates [N, d] scored again where the
    ranking is read. Indexing reads only the k rows (of a memory-mapped store: their pages).
    As faiss's IndexRefine does, the approximate pass picks the k and float32 orders them:
    the others are all lowered by one amount per row, the least that puts them under the
    lowest of the k, so the top k of the result are exactly the rescored ones, with float32's
    scores, and the rest keep their order (rank and MRR below k read the approximate pass).
    """
    k = min(k, scores.size(1))
    if k <= 0:
        return scores
    top = scores.topk(k, dim=1).indices  # [B, k]
    rows = candidates[top.to(candidates.device)].to(scores.device)  # [B, k, d]
    exact = rescore(rows).to(scores.dtype)  # [B, k]
    floor = exact.min(dim=1, keepdim=True).values  # [B, 1]
    rest = scores.scatter(1, top, -float("inf"))  # [B, N], the top k left out
    shift = (rest.amax(dim=1, keepdim=True) - floor).clamp(min=0)  # [B, 1]
    below = torch.minimum(rest - shift, torch.nextafter(floor, torch.full_like(floor, -float("inf"))))
    return below.scatter(1, top, exact)
