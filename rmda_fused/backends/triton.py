"""Triton backend: the whole RMDA step fused, multi-tensor (kernels in rmda_fused.kernels).

One launch per dtype bucket, which also advances every tensor's t and A: grouping
none/elementwise in tiles of contiguous elements, channel groups in bands of consecutive
groups with all their rows (one DRAM pass; kernels/rmda_grouped.py states the L2 model).
No host sync: lr (a float is written to a small device tensor), grad_scale and found_inf are
read by the kernels from device memory, and a step with found_inf set changes nothing.
Runs on CUDA tensors; on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 when
triton was imported), which is for testing.
"""
from __future__ import annotations

import torch

from ..batch import StepBatch, StepOptions
from . import split_lr

_IMPORT_ERROR: str | None = None
try:
    import triton  # noqa: F401

    from rmda_fused import kernels as _kernels
    from rmda_fused.kernels._common import hyper_tensor
except Exception as exc:  # the reason is reported, never a silent fallback
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    _kernels = None


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton kernels cannot be imported: {_IMPORT_ERROR}"
    if _kernels.interpreted():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to test on CPU)"
    try:
        triton.runtime.driver.active.get_current_device()
    except Exception as exc:
        return f"triton has no working GPU driver: {type(exc).__name__}: {exc}"
    return None


def handles(device: torch.device) -> bool:
    if _kernels is None:
        return False
    # the interpreter dereferences table pointers in host memory: CPU tensors only there
    return device.type == ("cpu" if _kernels.interpreted() else "cuda")


def rmda_step_(batch: StepBatch, options: StepOptions) -> int:
    """The step of docs/algorithm.md, "The update", on a batch that rmda_fused.functional
    has validated (one device, dense tensors walked through their memory-order group views,
    the fused dtypes, grad_scale and found_inf on that device); returns the number of kernel
    launches it made. On CUDA it launches under that device's guard, on its current stream,
    whichever device is current."""
    if not len(batch):
        return 0
    if _kernels is None:
        raise RuntimeError(unavailable_reason())
    device = batch.params[0].device
    if device.type == "cuda":  # Triton launches on the current device's current stream
        with torch.cuda.device(device):
            return _launch(batch, options)
    return _launch(batch, options)


def _launch(batch: StepBatch, options: StepOptions) -> int:
    lr, lr_tensor = split_lr(options.lr, batch.params[0].device)
    launches = 0
    # one launch per dtype combination: the tables' pointers are typed at compile time
    for _, bucket in batch.buckets():
        common = dict(hyper=hyper_tensor(bucket, lr, options.momentum, options.lam),
                      lr=lr_tensor, grad_scale=options.grad_scale,
                      found_inf=options.found_inf)
        if options.grouping in ("none", "elementwise"):
            launches += _kernels.rmda_elementwise_step_(
                bucket, prox=options.grouping == "elementwise", **common)
        else:
            launches += _kernels.rmda_grouped_step_(bucket, grouping=options.grouping,
                                                    **common)
    return launches


def rmda_partials_(batch: StepBatch, options: StepOptions, partials: list[torch.Tensor]) -> int:
    """Phase 1 of a coupled-group step (the contract of rmda_fused.coupled): t, A and V
    advanced, and ``partials[i][k]`` = the sum of z^2 over input-channel group k of tensor
    i. With found_inf nonzero nothing changes. Returns the number of kernel launches."""
    return _on_device(batch, _partials_launches, options, partials)


def rmda_apply_(batch: StepBatch, options: StepOptions, scales: list[torch.Tensor]) -> int:
    """Phase 3 of a coupled-group step, after rmda_partials_ on the same batch: W <- (1 - c)
    W + c (scales[i][k] z) over group k of tensor i. Returns the number of kernel launches."""
    return _on_device(batch, _apply_launches, options, scales)


def _on_device(batch: StepBatch, launch, options: StepOptions, per_tensor: list) -> int:
    """``launch(batch, options, per_tensor)`` under the batch's device guard."""
    if not len(batch):
        return 0
    if _kernels is None:
        raise RuntimeError(unavailable_reason())
    if len(per_tensor) != len(batch):
        raise ValueError(f"{len(per_tensor)} per-tensor buffers for {len(batch)} parameters")
    device = batch.params[0].device
    if device.type == "cuda":
        with torch.cuda.device(device):
            return launch(batch, options, per_tensor)
    return launch(batch, options, per_tensor)


def _by_bucket(batch: StepBatch, per_tensor: list):
    """(dtype bucket, its entries of ``per_tensor``) per bucket of ``batch``; a bucket holds
    the batch's own parameter tensors, which locate its entries."""
    position = {id(p): i for i, p in enumerate(batch.params)}
    for _, bucket in batch.buckets():
        yield bucket, (per_tensor if bucket is batch else
                       [per_tensor[position[id(p)]] for p in bucket.params])


def _partials_launches(batch: StepBatch, options: StepOptions, partials: list) -> int:
    lr, lr_tensor = split_lr(options.lr, batch.params[0].device)
    return sum(_kernels.rmda_partials_step_(
        bucket, hyper=hyper_tensor(bucket, lr, options.momentum, options.lam), lr=lr_tensor,
        grad_scale=options.grad_scale, found_inf=options.found_inf, partials=mine)
        for bucket, mine in _by_bucket(batch, partials))


def _apply_launches(batch: StepBatch, options: StepOptions, scales: list) -> int:
    lr, _ = split_lr(options.lr, batch.params[0].device)  # the hyper tensor keeps its lr
    return sum(_kernels.rmda_apply_step_(
        bucket, hyper=hyper_tensor(bucket, lr, options.momentum, options.lam),
        found_inf=options.found_inf, scales=mine)
        for bucket, mine in _by_bucket(batch, scales))
