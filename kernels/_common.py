"""Plumbing shared by the RMDA Triton kernels: the per-tensor pointer table, its cache, and
IEEE-exact scalar helpers.

Every kernel receives one int64 ``meta`` table with a row per tensor (the columns below),
so a whole dtype bucket of parameters is updated by one launch, whatever the shapes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch
import triton
import triton.language as tl

# (tl.constexpr: the only kind of global a jitted function may read)
# columns of the meta table (int64)
COL_P, COL_G, COL_W0, COL_V, COL_MASK, COL_STEP, COL_ALPHA = map(tl.constexpr, range(7))
COL_D0, COL_D1, COL_D2, COL_D3 = map(tl.constexpr, range(7, 11))  # shape words, per kernel
NCOL = tl.constexpr(12)  # one spare column keeps rows 96 bytes apart

# columns of the per-tensor scratch written by the scalars kernel (state dtype)
SCR_BETA, SCR_SCALE, SCR_TAU, SCR_SKIP = map(tl.constexpr, range(4))
NSCR = tl.constexpr(4)

# hyper tensor (fp64 on the device): lr, c, 1 - c, lam
HYP_LR, HYP_C, HYP_OMC, HYP_LAM = map(tl.constexpr, range(4))

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


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


def meta_table(params, grads, initials, duals, steps, alphas, masks, dims, device):
    """int64 [n, NCOL]: data pointers and four shape words per tensor."""
    rows = []
    for p, g, w0, v, t, a, m, d in zip(params, grads, initials, duals, steps, alphas, masks, dims):
        row = [p.data_ptr(), g.data_ptr(), w0.data_ptr(), v.data_ptr(),
               0 if m is None else m.data_ptr(), t.data_ptr(), a.data_ptr()]
        row += list(d) + [0] * (NCOL.value - len(row) - len(d))
        rows.append(row)
    return to_device(rows, device)


_META_CACHE = LRUCache(64)


def cached_meta(kind, params, grads, initials, duals, steps, alphas, masks, dims, device):
    """The meta table, rebuilt only when a pointer or shape word changed since last time.

    The key is the table's whole content, so a hit is always exact (even if the allocator
    handed a freed address to a new tensor, the table for that address is the same).
    """
    key = (kind, str(device), tuple(dims),
           tuple(t.data_ptr() for t in params), tuple(t.data_ptr() for t in grads),
           tuple(t.data_ptr() for t in initials), tuple(t.data_ptr() for t in duals),
           tuple(t.data_ptr() for t in steps), tuple(t.data_ptr() for t in alphas),
           tuple(0 if m is None else m.data_ptr() for m in masks))
    return _META_CACHE.get(key, lambda: meta_table(
        params, grads, initials, duals, steps, alphas, masks, dims, device))


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


def hyper_tensor(params, device: torch.device, lr: float, c: float, lam: float):
    """The hyper tensor of this parameter list (one per param group, so that two groups with
    different lr do not rewrite one tensor back and forth every step)."""
    key = (str(device), tuple(p.data_ptr() for p in params))
    hyper = _HYPERS.get(key, lambda: Hyper(device))
    return hyper.update(lr, c, lam)
