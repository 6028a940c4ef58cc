"""What the RMDA Triton kernels share: the per-tensor pointer table and its cache (with the
arrival counters), the column names of the tables, the alignment hints and the
exact-rounding helpers.

Every kernel receives one int64 ``meta`` table with a row per tensor (the columns below),
so a whole dtype bucket of parameters is updated by one launch, whatever the shapes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from rmda_fused.batch import StepBatch

# (tl.constexpr: the only kind of global a jitted function may read)
# columns of the meta table (int64): data pointers, then four shape words whose meaning
# each kernel family defines
COL_P, COL_G, COL_W0, COL_V, COL_MASK, COL_STEP, COL_ALPHA = map(tl.constexpr, range(7))
COL_D0, COL_D1, COL_D2, COL_D3 = map(tl.constexpr, range(7, 11))
NCOL = tl.constexpr(12)  # one spare column keeps rows 96 bytes apart

# columns of the per-tensor scratch that rmda_scalars_ writes (state dtype) for kernels that
# read their scalars from it: beta = sqrt(t), the weight of g in V += weight * g
# (s / grad_scale), the prox threshold tau, and 1.0 for a step that found_inf skips
SCR_BETA, SCR_GRAD_WEIGHT, SCR_TAU, SCR_SKIP = map(tl.constexpr, range(4))
NSCR = tl.constexpr(4)

# the hyper tensor (fp64 on the device): lr, c, 1 - c, lam
HYP_LR, HYP_C, HYP_ONE_MINUS_C, HYP_LAM = map(tl.constexpr, range(4))

# ALIGNED kernels promise the compiler runs of VECTOR elements that start on a multiple of
# VECTOR elements of arrays on 16 bytes: 128-bit accesses for fp32, 64-bit for bf16
VECTOR = tl.constexpr(4)

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


# On GPUs Triton's fp32 "/" and tl.sqrt are approximate (a few ulps); div_rn and sqrt_rn
# round to nearest like the reference backend, so fused and reference steps agree to the
# last bit of every scalar. fp64 "/" and sqrt are already correctly rounded.
@triton.jit
def div_exact(a, b, FP64: tl.constexpr):
    return a / b if FP64 else tl.math.div_rn(a, b)


@triton.jit
def sqrt_exact(x, FP64: tl.constexpr):
    return tl.sqrt(x) if FP64 else tl.sqrt_rn(x)


@triton.jit
def element_pointers(tensor_row, P: tl.constexpr, G: tl.constexpr, I: tl.constexpr,
                     F: tl.constexpr):
    """The (W, g, W0, V) data pointers of a meta row, typed."""
    return (tl.load(tensor_row + COL_P).to(tl.pointer_type(P)),
            tl.load(tensor_row + COL_G).to(tl.pointer_type(G)),
            tl.load(tensor_row + COL_W0).to(tl.pointer_type(I)),
            tl.load(tensor_row + COL_V).to(tl.pointer_type(F)))


# Hints for ALIGNED kernels: a pointer read from a table carries no alignment the compiler
# could see, so each array's pointers at ``offs`` are declared to hold aligned runs of
# VECTOR elements on 16 bytes. (All four arrays in one call: the interpreter makes each
# call of a jitted helper slowly.)
@triton.jit
def vector_pointers(pointers, offs, ALIGNED: tl.constexpr):
    """(W, g, W0, V) pointers at 1-D ``offs``."""
    p, g, w0, v = pointers[0] + offs, pointers[1] + offs, pointers[2] + offs, pointers[3] + offs
    if ALIGNED:
        p = tl.max_contiguous(tl.multiple_of(p, 16), VECTOR)
        g = tl.max_contiguous(tl.multiple_of(g, 16), VECTOR)
        w0 = tl.max_contiguous(tl.multiple_of(w0, 16), VECTOR)
        v = tl.max_contiguous(tl.multiple_of(v, 16), VECTOR)
    return p, g, w0, v


@triton.jit
def momentum_weights(hyper, F: tl.constexpr):
    """(c, 1 - c) of W <- (1 - c) W + c z, in the state dtype F."""
    return tl.load(hyper + HYP_C).to(F), tl.load(hyper + HYP_ONE_MINUS_C).to(F)


@triton.jit
def round_to(x, P: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """x (fp32) rounded once to the parameter dtype P, to nearest even.

    Triton's interpreter truncates fp32 -> bf16 where GPUs round to nearest even; with
    EMULATE_BF16_RTNE (set only under the interpreter) the bits are rounded by hand so that
    CPU tests see what a GPU computes."""
    if EMULATE_BF16_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(P)
    return r


def emulate_bf16_rtne(dtype: torch.dtype) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return dtype == torch.bfloat16 and isinstance(round_to, InterpretedFunction)


def kernel_dtypes(batch: StepBatch) -> dict[str, object]:
    """The element kernels' dtype constexprs for a one-bucket batch: P (parameter),
    G (gradient), I (initial point), F (state) and FP64 (whether the state is fp64)."""
    state = batch.duals[0].dtype
    return dict(P=TORCH_TO_TL[batch.params[0].dtype], G=TORCH_TO_TL[batch.grads[0].dtype],
                I=TORCH_TO_TL[batch.initials[0].dtype], F=TORCH_TO_TL[state],
                FP64=state == torch.float64)


class LRUCache:
    """A tiny LRU keyed by hashable tuples; tables are rebuilt only when a key is new."""

    def __init__(self, maxsize: int = 32) -> None:
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._maxsize = maxsize
        self.builds = 0  # misses, for tests: a stable parameter list must stop building

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = build()
        self.builds += 1
        self._data[key] = value
        if len(self._data) > self._maxsize:
            self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def to_device(rows: list[list[int]] | torch.Tensor, device: torch.device, dtype=torch.int64):
    """A host table copied to ``device`` without a host sync (pageable, stream-ordered)."""
    host = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=dtype)
    host = host.to(dtype).contiguous()
    if host.numel() == 0:  # kernels never read it, but the argument must be a pointer
        host = torch.zeros(1, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.to(device, non_blocking=True)


def _pointer_columns(batch: StepBatch) -> list[tuple[int, ...]]:
    """Per tensor, the data pointers in the order of the COL_* columns (0: no mask)."""
    return [(p.data_ptr(), g.data_ptr(), w0.data_ptr(), v.data_ptr(),
             0 if m is None else m.data_ptr(), t.data_ptr(), a.data_ptr())
            for p, g, w0, v, t, a, m in zip(batch.params, batch.grads, batch.initials,
                                            batch.duals, batch.steps, batch.alphas,
                                            batch.zero_masks)]


def meta_table(batch: StepBatch, dims: Sequence[tuple[int, ...]], device: torch.device):
    """int64 [n, NCOL]: data pointers and up to four shape words (``dims``) per tensor."""
    rows = [list(pointers) + list(d) + [0] * (NCOL.value - len(pointers) - len(d))
            for pointers, d in zip(_pointer_columns(batch), dims)]
    return to_device(rows, device)


_META_CACHE = LRUCache(64)


def cached_meta(kind: Hashable, batch: StepBatch, dims: Sequence[tuple[int, ...]],
                device: torch.device):
    """The meta table, rebuilt only when a pointer or shape word changed since last time.

    The key is the table's whole content, so a hit is always exact (even if the allocator
    handed a freed address to a new tensor, the table for that address is the same).
    """
    key = (kind, str(device), tuple(dims), tuple(_pointer_columns(batch)))
    return _META_CACHE.get(key, lambda: meta_table(batch, dims, device))


def cached_meta_and_counters(kind: Hashable, batch: StepBatch,
                             dims: Sequence[tuple[int, ...]], device: torch.device):
    """:func:`cached_meta` and, cached with it, one zeroed int32 arrival counter per tensor
    (rmda_scalars.tensor_step_scalars). A kernel leaves its counters at 0 again, and one
    parameter list never shares counters with another (the key holds its pointers)."""
    key = ("counted", kind, str(device), tuple(dims), tuple(_pointer_columns(batch)))
    return _META_CACHE.get(key, lambda: (
        meta_table(batch, dims, device),
        torch.zeros(max(len(batch), 1), dtype=torch.int32, device=device)))


def pointers_aligned(batch: StepBatch, alignment: int = 16) -> bool:
    """Whether every element array of the batch (W, g, W0, V) starts on ``alignment`` bytes."""
    return all(t.data_ptr() % alignment == 0
               for arrays in (batch.params, batch.grads, batch.initials, batch.duals)
               for t in arrays)


class Hyper:
    """lr, c, 1-c, lam in one small fp64 device tensor, rewritten only when they change.

    A Python float lr reaches the kernels through this tensor, never as a kernel argument,
    so an LR scheduler neither recompiles nor specializes anything.
    """

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(4, dtype=torch.float64, device=device)
        self._last: tuple[float, ...] | None = None

    def update(self, lr: float, c: float, lam: float) -> torch.Tensor:
        values = (float(lr), float(c), 1.0 - float(c), float(lam))
        if values != self._last:
            host = torch.tensor(values, dtype=torch.float64)
            self.tensor.copy_(host, non_blocking=self.tensor.device.type != "cpu")
            self._last = values
        return self.tensor


_HYPERS = LRUCache(64)


def hyper_tensor(batch: StepBatch, lr: float, c: float, lam: float) -> torch.Tensor:
    """The hyper tensor of this batch's parameters (one per param group, so that two groups
    with different lr do not rewrite one tensor back and forth every step)."""
    device = batch.params[0].device
    key = (str(device), tuple(p.data_ptr() for p in batch.params))
    hyper = _HYPERS.get(key, lambda: Hyper(device))
    return hyper.update(lr, c, lam)
