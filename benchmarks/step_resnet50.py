"""Time one optimizer.step() over torchvision ResNet-50's parameters (161 tensors, 25.6M).

    python -m benchmarks.step_resnet50 [--device cpu|cuda] [--dtype float32|bfloat16|...]

Compares RMDA (C++/CUDA backend and the reference backend; group LASSO on conv/linear
weights via rmda_fused.param_groups) with torch.optim.SGD(momentum=0.9) foreach and fused,
reporting medians, the ratio to fused SGD, and the bandwidth each step achieves against the
minimum bytes it must move, next to the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rmda_fused import RMDA, functional, param_groups

LR, RMDA_C, SGD_MOMENTUM, LAM = 0.01, 0.1, 0.9, 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """GB/s (bytes read + written) of dst.copy_(src) and of dst.add_(src), 256 MiB each.

    copy_ writes memory it never reads, which costs CPUs a hidden read per write (write
    allocate); add_ reads what it writes, like an optimizer step, so it is the fairer ceiling.
    """
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = median_seconds(lambda: dst.copy_(src), device, warmup, steps)
    add = median_seconds(lambda: dst.add_(src), device, warmup, steps)
    return 2 * src.numel() * 4 / copy / 1e9, 3 * src.numel() * 4 / add / 1e9


def _ensure_backend(name: str) -> None:
    # until functional.py registers the C++ backends, reach them directly
    if name not in functional._BACKEND_MODULES:
        functional._BACKEND_MODULES[name] = f"rmda_fused.backends.{name}"
        functional._load.cache_clear()


def build_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import torchvision

    model = torchvision.models.resnet50(weights=None).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model


def bytes_per_element(method: str, dtype: torch.dtype) -> int:
    """The minimum a step must move per parameter element (SPEC.md, "Memory traffic")."""
    p = torch.empty((), dtype=dtype).element_size()
    state = 8 if dtype == torch.float64 else 4
    if method.startswith("rmda"):
        return 4 * p + 2 * state  # read g, W, W0, V; write W, V
    return 5 * p  # SGD: read g, p, buf; write p, buf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--grouping", default="input_channel",
                        help="grouping of the conv/linear weights (lam > 0)")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_backend = "cuda" if device.type == "cuda" else "cpu"
    _ensure_backend(fused_backend)

    model = build_model(device, dtype)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    print(f"ResNet-50: {len(params)} tensors, {numel / 1e6:.2f}M elements, {dtype}, {device}, "
          f"RMDA grouping {args.grouping}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    copy_gbs, add_gbs = copy_bandwidth(device, args.warmup, args.steps)
    print(f"bandwidth (read+write, 256 MiB): copy_ {copy_gbs:.1f} GB/s, in-place add_ "
          f"{add_gbs:.1f} GB/s")

    methods = {
        f"rmda {fused_backend}": lambda: RMDA(param_groups(model, LAM, args.grouping), lr=LR,
                                              momentum=RMDA_C, backend=fused_backend),
        "sgd foreach": lambda: torch.optim.SGD(params, lr=LR, momentum=SGD_MOMENTUM, foreach=True),
        "sgd fused": lambda: torch.optim.SGD(params, lr=LR, momentum=SGD_MOMENTUM, fused=True),
    }
    if not args.skip_reference:
        methods["rmda reference"] = lambda: RMDA(param_groups(model, LAM, args.grouping), lr=LR,
                                                 momentum=RMDA_C, backend="reference")
    # Steps of the methods alternate, so that load from other processes on a shared machine
    # hits every method alike; the slow reference backend takes fewer rounds.
    optimizers = {name: make() for name, make in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for name, opt in optimizers.items():
            for _ in range(args.warmup if name != "rmda reference" else 1):
                opt.step()
        for round_ in range(args.steps):
            for name, opt in optimizers.items():
                if name == "rmda reference" and round_ >= 3:
                    continue
                _sync(device)
                start = time.perf_counter()
                opt.step()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    results = {name: statistics.median(ts) for name, ts in times.items()}
    base = results["sgd fused"]
    print(f"{'method':<16}{'median ms':>11}{'/ fused SGD':>13}{'B/elem':>8}{'GB/s':>8}{'% add_':>8}")
    for name, seconds in results.items():
        bpe = bytes_per_element(name, dtype)
        gbs = bpe * numel / seconds / 1e9
        print(f"{name:<16}{seconds * 1e3:>11.2f}{seconds / base:>13.3f}{bpe:>8}{gbs:>8.1f}"
              f"{100 * gbs / add_gbs:>7.0f}%")
    floor = bytes_per_element("rmda", dtype) / bytes_per_element("sgd", dtype)
    print(f"traffic floor RMDA / SGD = {floor:.2f}x; B/elem is the minimum each step must move "
          "(foreach SGD and the reference backend move more)")


if __name__ == "__main__":
    main()
