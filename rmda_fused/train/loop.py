"""One training epoch and one evaluation, on every process."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..sharding import local
from . import distributed
from .distributed import Dist

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(args: Any, device: torch.device):
    if args.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[args.amp])


def to_device(x: torch.Tensor, y: torch.Tensor, args: Any, device: torch.device):
    x = x.to(device, non_blocking=True)
    if args.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


class StepTimer:
    """Time of whole steps and of their optimizer.step(), without a host sync per step:
    CUDA events on GPUs (read once at the end of the epoch), the wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[Any, Any, Any]] = []
        self.step_s = self.optimizer_s = 0.0

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: Any, before_step: Any, end: Any) -> None:
        if self.cuda:
            self.marks.append((start, before_step, end))
        else:
            self.step_s += end - start
            self.optimizer_s += end - before_step

    def optimizer_share(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            for start, before_step, end in self.marks:
                self.step_s += start.elapsed_time(end) / 1e3
                self.optimizer_s += before_step.elapsed_time(end) / 1e3
            self.marks.clear()
        return self.optimizer_s / self.step_s if self.step_s else 0.0


def train_epoch(args: Any, info: Dist, model: nn.Module, loader: Any, optimizer, scaler, loss_fn,
                bar: Any, budget: int | None) -> dict[str, Any]:
    """One pass over this process's shard. ``budget``: steps left before --stop-after-steps
    (None: no limit); the returned ``steps`` says how many were taken."""
    model.train()
    timer = StepTimer(info.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    images = steps = 0
    start = time.perf_counter()
    for x, y in loader:
        if budget is not None and steps >= budget:
            break
        x, y = to_device(x, y, args, info.device)
        t0 = timer.mark()
        with autocast(args, info.device):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        t1 = timer.mark()
        scaler.step(optimizer)  # fp16: RMDA unscales inside its step (grad_scale/found_inf)
        scaler.update()
        timer.add(t0, t1, timer.mark())
        loss_sum += loss.detach().double() * len(y)  # stays on the device: no sync per step
        images += len(y)
        steps += 1
        if bar is not None:
            bar.update(1)
            if steps % 50 == 1:  # a sync every 50 steps is negligible
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    share = timer.optimizer_share()  # synchronizes the device once
    seconds = time.perf_counter() - start
    loss_total, image_total = distributed.all_reduce_sum(info, [float(loss_sum), float(images)])
    return dict(steps=steps, train_loss=loss_total / max(image_total, 1),
                images_per_s=image_total / seconds if seconds else 0.0, optimizer_share=share,
                train_seconds=seconds)


@torch.no_grad()
def nonfinite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the model's floating-point parameters and buffers, and of the optimizer's
    state tensors, that hold a NaN or inf (one host sync for all of them)."""
    names = {p: name for name, p in model.named_parameters()}
    # sharded (--fsdp): this process's shards; the caller sums the verdicts over processes
    tensors = {name: local(t) for name, t in model.state_dict().items() if t.is_floating_point()}
    for p, state in optimizer.state.items():
        for key, t in state.items():
            if torch.is_tensor(t) and t.is_floating_point():
                tensors[f"{names.get(p, 'a parameter')} (optimizer state {key})"] = local(t)
    finite = torch.stack([t.isfinite().all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite) if not ok]


@torch.no_grad()
def evaluate(args: Any, info: Dist, model: nn.Module, loader: Any) -> tuple[float, float]:
    """(top-1, top-5) accuracy over the whole validation set, all processes together."""
    model.eval()
    correct1 = torch.zeros((), dtype=torch.float64, device=info.device)
    correct5 = torch.zeros_like(correct1)
    count = 0
    for x, y in loader:
        x, y = to_device(x, y, args, info.device)
        with autocast(args, info.device):
            out = model(x)
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y[:, None]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
        count += len(y)
    c1, c5, n = distributed.all_reduce_sum(info, [float(correct1), float(correct5), float(count)])
    model.train()
    return c1 / max(n, 1), c5 / max(n, 1)
