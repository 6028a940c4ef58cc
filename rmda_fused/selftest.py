"""``python -m rmda_fused.selftest``: what to run on a new machine.

It prints, as it goes,

1. the environment: torch, the device, cores, and every backend with why it is unavailable;
2. correctness: every selected backend that runs here against a float64 statement of the
   update (rmda_fused/_selftest_correctness.py): the four groupings in fp32 and bf16, a
   restart, and a GradScaler step with ``found_inf`` set, which must change nothing;
3. performance: RMDA's step on each fused backend over ResNet-50's parameter list (fp32),
   next to torch's SGD (momentum 0.9, fused and foreach) and rmda_fused.ProxSGD timed in
   the same run, as ratios to fused SGD; the copy bandwidth; on CUDA, kernels per step;
4. a verdict: PASS/FAIL per correctness case and per performance target,

and writes every number with the machine description to a JSON report. The exit status is
1 when a correctness case fails; a missed performance target is reported, not an error.
``--quick`` (CI) times a small parameter list with fewer repetitions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from . import __version__
from ._selftest_correctness import CASES, check_backend
from .functional import available_backends, resolve_backend
from .optimizer import RMDA
from .proxsgd import ProxSGD

LR, SGD_MOMENTUM, RMDA_MOMENTUM, LAM = 0.01, 0.9, 0.1, 1e-4  # RMDA's momentum is c
RMDA_BYTES_PER_ELEMENT = 24  # fp32: the least a step moves (docs/algorithm.md, "Memory traffic")
TARGETS = {  # per device: RMDA / fused SGD at most, RMDA faster than ProxSGD, launches per step
    "cuda": dict(max_ratio=1.25, beat_proxsgd=True, max_launches=2),
    "cpu": dict(max_ratio=1.3, beat_proxsgd=False, max_launches=None),
}
QUICK_SHAPES = [(64, 32, 3, 3), (64,), (64,), (128, 64, 3, 3), (128,), (128,),
                (256, 128, 1, 1), (256,), (256,), (10, 256), (10,)]
MODES = {  # timing: rounds of (steps per round) steps per method; copy buffer size
    "quick": dict(rounds=7, per_round=5, warmup=2, copy_mib=32),
    "full": dict(rounds=15, per_round=5, warmup=3, copy_mib=256),
}


def say(line: str = "") -> None:
    print(line, flush=True)


# -- environment -------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                rmda_fused=__version__, torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(),
                cpu=_cpu_model(), cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                # other processes skew CPU timings: say how busy the machine was
                load_average_1min=(round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg")
                                   else None),
                triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # not installed, or broken: available_backends() says which
        info["triton"] = None
    return info


def backend_devices(names: list[str]) -> dict[str, str]:
    """Each backend among ``names`` that runs here, mapped to the device it is checked on:
    CUDA where it takes CUDA tensors and a GPU is present, else the CPU."""
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    found = {}
    for name in names:
        for device in devices:
            try:
                resolve_backend(name, torch.device(device))
            except RuntimeError:
                continue
            found[name] = device
            break
    return found


# -- performance -------------------------------------------------------------------------------

def builtin_resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's resnet50() parameter shapes, in its order (for machines without it)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = 4 * width
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,), (out, width, 1, 1), (out,), (out,)]
            if block == 0:  # the downsample branch: 1x1 conv and its norm
                shapes += [(out, in_channels, 1, 1), (out,), (out,)]
            in_channels = out
    return shapes + [(1000, 2048), (1000,)]


def resnet50_shapes() -> tuple[str, list[tuple[int, ...]]]:
    try:
        import torchvision
    except ImportError:
        return "ResNet-50 (built-in shape list)", builtin_resnet50_shapes()
    with torch.device("meta"):  # shapes only: on the meta device nothing is allocated
        model = torchvision.models.resnet50()
    return "ResNet-50 (torchvision)", [tuple(p.shape) for p in model.parameters()]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(calls: dict[str, Callable[[], object]], device: str, rounds: int,
                     per_round: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median and least seconds per call of each callable, over ``rounds`` rounds. Rounds
    interleave the callables, so that drift of a shared machine (other processes, clocks)
    hits all of them alike; the least time is what an idle machine gives. Calls within a
    round queue up between two synchronisations, as the steps of a training loop do."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                call()
            _sync(device)
            samples[label].append((time.perf_counter() - start) / per_round)
    return {label: dict(median_s=statistics.median(xs), min_s=min(xs))
            for label, xs in samples.items()}


def copy_bandwidth_GBps(device: str, mib: int, repeats: int) -> float:
    """Read + write bandwidth of ``dst.copy_(src)`` on buffers of ``mib`` MiB."""
    src = torch.ones(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    times = seconds_per_call({"copy": lambda: dst.copy_(src)}, device, repeats, 1, 2)["copy"]
    return 2 * mib * 2**20 / times["median_s"] / 1e9


def kernel_launches(step: Callable[[], object]) -> int | None:
    """GPU kernels one call of ``step`` runs, from torch.profiler (memory copies and sets are
    other activity types); None where the profiler cannot trace the GPU (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except Exception:
        return None
    return sum(1 for e in prof.events() if is_kernel_event(e))


def is_kernel_event(event) -> bool:
    """Whether a torch.profiler event is a GPU kernel (not a copy, a memset, or the
    ``Optimizer.step#...`` annotation, which the profiler also puts on the GPU's timeline)."""
    kind = getattr(event, "activity_type", None)  # newer torch names the activity (2.11 does not)
    if kind is not None:
        return kind == "kernel"
    return (event.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith(("Memcpy", "Memset", "Optimizer.")))


def _optimizers(backends: list[str]) -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    # one param group each: in a channel grouping, RMDA and ProxSGD leave 1-D tensors
    # (biases, norms) unregularized, as rmda_fused.param_groups would
    made = {f"RMDA {b}": (lambda ps, b=b: RMDA(ps, lr=LR, momentum=RMDA_MOMENTUM, lam=LAM,
                                                 backend=b)) for b in backends}
    made["ProxSGD fused"] = lambda ps: ProxSGD(ps, lr=LR, momentum=SGD_MOMENTUM, lam=LAM,
                                               fused=True)
    for impl in ("fused", "foreach"):
        made[f"SGD {impl}"] = (lambda ps, impl=impl: torch.optim.SGD(
            ps, lr=LR, momentum=SGD_MOMENTUM, **{impl: True}))
    return made


def performance(device: str, backends: list[str], mode: str) -> dict:
    """Step times on ``device`` of RMDA on each of ``backends`` and of the baselines."""
    settings = MODES[mode]
    workload, shapes = (("a small list", QUICK_SHAPES) if mode == "quick" else resnet50_shapes())
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [0.1 * torch.randn(s, device=device, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
    result = dict(device=device, workload=workload, dtype="fp32", tensors=len(shapes),
                  numel=sum(w.numel() for w in weights), timing=settings, skipped={})
    result["copy_bandwidth_GBps"] = copy_bandwidth_GBps(device, settings["copy_mib"],
                                                        settings["rounds"])
    steps = {}
    for label, make in _optimizers(backends).items():
        params = [w.clone().requires_grad_(True) for w in weights]  # each steps its own copy
        for p, g in zip(params, grads):
            p.grad = g  # shared: no method writes the gradients
        try:
            steps[label] = make(params).step
            steps[label]()  # e.g. fused SGD without a kernel for this device raises here
        except Exception as exc:
            result["skipped"][label] = f"{type(exc).__name__}: {exc}"
            steps.pop(label, None)
    times = seconds_per_call(steps, device, settings["rounds"], settings["per_round"],
                             settings["warmup"])
    base = times.get("SGD fused", {}).get("median_s")
    result["methods"] = {label: dict(t, ratio_to_fused_sgd=t["median_s"] / base if base else None)
                         for label, t in times.items()}
    for label, entry in result["methods"].items():
        if label.startswith("RMDA"):
            entry["GBps"] = RMDA_BYTES_PER_ELEMENT * result["numel"] / entry["median_s"] / 1e9
        if device == "cuda":
            entry["kernel_launches"] = kernel_launches(steps[label])
    return result


def targets(perf: dict) -> list[dict]:
    """The performance targets of one device's timings, each with its value and verdict
    (None where the value could not be measured)."""
    target = TARGETS[perf["device"]]
    max_ratio, max_launches = target["max_ratio"], target["max_launches"]
    methods, found = perf["methods"], []
    prox = methods.get("ProxSGD fused", {}).get("median_s")
    for label, entry in methods.items():
        if not label.startswith("RMDA"):
            continue
        ratio = entry["ratio_to_fused_sgd"]
        found.append(dict(method=label, target=f"<= {max_ratio}x fused SGD", value=ratio,
                          passed=None if ratio is None else ratio <= max_ratio))
        if target["beat_proxsgd"]:
            value = entry["median_s"] / prox if prox else None
            found.append(dict(method=label, target="faster than ProxSGD (x ProxSGD < 1)",
                              value=value, passed=None if value is None else value < 1))
        if max_launches is not None:
            launches = entry["kernel_launches"]
            found.append(dict(method=label, target=f"<= {max_launches} kernel launches per step",
                              value=launches,
                              passed=None if launches is None else launches <= max_launches))
    return found


# -- the command ---------------------------------------------------------------------------------

def _verdict_word(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def _print_environment(info: dict, backends: dict[str, str | None]) -> None:
    say("== environment")
    say(f"rmda_fused {info['rmda_fused']}, torch {info['torch']}, python {info['python']}, "
        f"triton {info['triton'] or 'not installed'}")
    say(f"platform {info['platform']}")
    say(f"cpu: {info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads, "
        f"load average {info['load_average_1min']}")
    say(f"gpu: {info.get('gpu', 'none')}" + (f", CUDA {info['cuda']}" if "gpu" in info else ""))
    say("backends:")
    for name, reason in backends.items():
        say(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")


def _print_performance(perf: dict) -> None:
    say(f"  {perf['workload']}: {perf['tensors']} tensors, {perf['numel'] / 1e6:.2f}M elements; "
        f"copy bandwidth {perf['copy_bandwidth_GBps']:.1f} GB/s")
    for label, entry in perf["methods"].items():
        ratio = entry["ratio_to_fused_sgd"]
        line = (f"  {label:16s} {entry['median_s'] * 1e3:9.3f} ms (min {entry['min_s'] * 1e3:.3f})"
                f"  {'?' if ratio is None else f'{ratio:5.2f}'}x fused SGD")
        if "GBps" in entry:
            line += (f", {entry['GBps']:.1f} GB/s "
                     f"({entry['GBps'] / perf['copy_bandwidth_GBps']:.0%} of copy)")
        launches = entry.get("kernel_launches", "n/a (CPU)")
        say(line + f", launches per step {'?' if launches is None else launches}")
    for label, reason in perf["skipped"].items():
        say(f"  {label:16s} not timed: {reason}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    known = list(available_backends())
    ap = argparse.ArgumentParser(
        prog="python -m rmda_fused.selftest",
        description="Check every rmda_fused backend that runs here against a float64 "
                    "statement of RMDA and time it against torch's SGD.")
    ap.add_argument("--quick", action="store_true",
                    help="a small parameter list and fewer timing repetitions (CI)")
    ap.add_argument("--report", default="rmda-selftest.json",
                    help="where to write the JSON report (default: %(default)s)")
    ap.add_argument("--backends", default=",".join(known),
                    help="comma-separated subset of %(default)s")
    args = ap.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(known))
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {known}")
    return args


def run_correctness(devices: dict[str, str], large: bool) -> list[dict]:
    results = []
    for name, device in devices.items():
        for result in check_backend(name, device, large):
            results.append(result)
            say(f"  {name:10s} {device:4s} {result['case']:22s} "
                f"{_verdict_word(result['passed'])}  ({result['seconds']:.2f} s)")
            for line in result["differences"] + result["warnings"]:
                say(f"      {line}")
    return results


def run_performance(devices: dict[str, str], mode: str, load: float | None) -> list[dict]:
    results = []
    for device in dict.fromkeys(devices.values()):
        # Triton takes CPU tensors only in its interpreter, whose speed says nothing
        timed = [b for b, d in devices.items() if d == device and b != "reference"
                 and not (b == "triton" and device == "cpu")]
        if not timed:
            continue
        say(f"== performance on {device}, fp32 (step times: median of {MODES[mode]['rounds']} "
            "rounds)")
        busy = load is not None and load >= 1  # at the start: the load of other processes
        if busy:
            say(f"  note: other processes are running (1-min load average {load:.1f} on "
                f"{os.cpu_count()} cores): CPU timings are skewed, as a multi-threaded step "
                "waits for its descheduled threads")
        say(f"  timing RMDA on {', '.join(timed)}, ProxSGD and SGD ...")
        perf = performance(device, timed, mode)
        _print_performance(perf)
        perf.update(targets=targets(perf), busy_machine=busy)
        results.append(perf)
    return results


def print_verdict(report: dict) -> None:
    say("== verdict")
    cases = report["correctness"]
    passed = sum(r["passed"] for r in cases)
    say(f"  correctness: {passed} of {len(cases)} cases passed  "
        f"{_verdict_word(report['correctness_passed'])}")
    for r in cases:
        if not r["passed"]:
            say(f"    FAIL {r['backend']} on {r['device']}: {r['case']}")
    for perf in report["performance"]:
        for t in perf["targets"]:
            value = t["value"]  # a ratio, or a number of launches
            shown = "?" if value is None else (f"{value:.2f}" if isinstance(value, float)
                                               else str(value))
            say(f"  {perf['device']:4s} {t['method']:12s} {t['target']:40s} {shown:>6}  "
                f"{_verdict_word(t['passed'])}")
        if perf["busy_machine"]:
            say(f"  ({perf['device']}: other processes were running, so these ratios may be far "
                "off; rerun on an idle machine)")
    if report["mode"] == "quick" and report["performance"]:
        say("  (quick: a small parameter list; the targets are stated for ResNet-50's)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    report: dict = dict(command=["python", "-m", "rmda_fused.selftest", *argv],
                        mode=mode, machine=machine(), backends=available_backends())
    say(f"rmda_fused selftest ({mode})")
    _print_environment(report["machine"], report["backends"])

    devices = backend_devices(args.backends)
    say(f"== correctness: each backend against float64, {len(CASES)} cases")
    for name in args.backends:
        if name not in devices:
            say(f"  {name:10s} not checked: "
                f"{report['backends'][name] or 'takes tensors of no device here'}")
    report["correctness"] = run_correctness(devices, large=not args.quick)
    # a selftest that checked nothing does not pass
    report["correctness_passed"] = bool(report["correctness"]) and all(
        r["passed"] for r in report["correctness"])
    report["performance"] = run_performance(devices, mode,
                                            report["machine"]["load_average_1min"])
    print_verdict(report)
    report["seconds"] = time.perf_counter() - start
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    say(f"report: {os.path.abspath(args.report)} ({report['seconds']:.0f} s)")
    return 0 if report["correctness_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
