"""``python -m rmda_fused.train`` / ``rmda-train``: command line, presets, and entry points.

Defaults are the authors' ImageNet recipe (ResNet-50, global batch 256, 160 epochs, RMDA with
lr 1.0, c 0.1, lam 1.35e-5, restarts at epochs 40/80/120 with gamma 0.1, label smoothing
0.1, AMP). ``--preset digits`` is the CPU demo instead (``python -m rmda_fused.demo``).
Launch as is for one process, or under ``torchrun --nproc_per_node=N`` for DDP.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from .checkpoint import FIXED_ON_RESUME
from .data import DIGITS_SOURCE, canonical_source
from .models import DIGITS_ARCH, check_arch
from .optim import DEFAULT_LR, DEFAULT_MOMENTUM

# milestones default to these fractions of --epochs (the recipe's 40/80/120 of 160)
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": dict(arch="resnet50", epochs=160, batch_size=256, lam=1.35e-5,
                     milestone_fractions=(0.25, 0.5, 0.75), label_smoothing=0.1, amp="auto",
                     image_size=224, workers=8, threads=0),
    # the demo: a small CNN on scikit-learn's digits, on one CPU thread, in about half a minute
    "digits": dict(data=DIGITS_SOURCE, arch=DIGITS_ARCH, epochs=100, batch_size=64, lr=0.1,
                   momentum=0.1, lam=1e-3, milestone_fractions=(0.6,), label_smoothing=0.0,
                   amp="none", device="cpu", image_size=8, workers=0, threads=1),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: the usage runs to 20 lines, --help shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="rmda-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a torchvision classifier with RMDA (or the ProxSGD/SGD baselines) on an "
                    "ImageFolder tree; one process, or DDP (or FSDP2 with --fsdp) under "
                    "torchrun --nproc_per_node=N.",
        epilog=__doc__.split("\n\n")[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="imagenet",
                   help="default values of every other flag")
    p.add_argument("--data", help=f"ImageFolder root with train/ and val/, or {DIGITS_SOURCE}")
    p.add_argument("--arch", help=f"torchvision classification model, or {DIGITS_ARCH}")
    p.add_argument("--image-size", type=int, help="training crop; validation resizes to 256/224 of it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, split over the processes")
    p.add_argument("--optimizer", choices=["rmda", "proxsgd", "sgd"], default="rmda")
    p.add_argument("--lr", type=finite_float, help=f"default per optimizer: {DEFAULT_LR}")
    p.add_argument("--momentum", type=finite_float,
                   help=f"RMDA: c, the weight of the new point (not SGD's 0.9); default {DEFAULT_MOMENTUM}")
    p.add_argument("--momentum-schedule", choices=["iclr", "sqrt", "none"], default="iclr",
                   help="RMDA's c at restarts (rmda_fused.MultiStepRestart)")
    p.add_argument("--lam", type=finite_float, help="regularization strength (rmda, proxsgd)")
    p.add_argument("--grouping", default="input_channel",
                   choices=["input_channel", "output_channel", "elementwise", "coupled"],
                   help="coupled: one group per channel over every conv/linear that reads it, "
                        "so that each zero group is a channel --export-slim removes")
    p.add_argument("--weight-decay", type=finite_float, default=1e-4, help="--optimizer sgd only")
    p.add_argument("--milestones", type=int, nargs="*",
                   help="epochs after which lr *= gamma (and RMDA restarts); default: the preset's "
                        "fractions of --epochs")
    p.add_argument("--gamma", type=finite_float, default=0.1)
    p.add_argument("--label-smoothing", type=finite_float)
    p.add_argument("--backend", default="auto", help="RMDA backend (rmda_fused.available_backends())")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype; auto: bf16 on GPUs, none on CPU; fp16 adds a GradScaler")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last model and inputs (RMDA's fused kernels take contiguous weights: "
                        "conv weights then run on the reference backend, with a warning)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 instead of DDP: fully_shard each child holding parameters of "
                        "the model's top-level nn.Sequential stages (a ResNet's blocks), then "
                        "the root, over one device mesh of all processes (one process works "
                        "too); the optimizer steps the sharded parameters. Checkpoints are "
                        "then torch.distributed.checkpoint directories, --output/"
                        "checkpoint.dcp, which --resume reshards onto any number of "
                        "processes (each then keeps the RNG stream it was seeded with unless "
                        "the number is the same); a checkpoint.pt of a run without --fsdp is "
                        "not resumed with it, nor the other way round. Not with "
                        "--channels-last")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda if available (NCCL), else cpu (gloo)")
    p.add_argument("--workers", type=int, help="data-loading processes per training process")
    p.add_argument("--threads", type=int, help="torch threads per process (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output",
                   help="run directory: checkpoint.pt (the last finished epoch whose training "
                        "loss, weights and optimizer state are all finite: a run that diverges "
                        "to NaN or inf stops there with exit status 1, and final.json says "
                        "diverged), log.jsonl, plots, final model")
    p.add_argument("--resume", action="store_true",
                   help="continue from --output/checkpoint.pt. The run's "
                        f"{', '.join('--' + k.replace('_', '-') for k in FIXED_ON_RESUME)} must "
                        "be those it started with (--data as a resolved path): a changed value "
                        "is refused, not applied (the optimizer and scheduler states hold the "
                        "old ones). --epochs may change; the default --milestones follow it, so "
                        "pass the run's milestones when changing it")
    p.add_argument("--export-slim", action="store_true",
                   help="at the end, write --output/slim.pt: the physically smaller model. If "
                        "the export fails (e.g. an architecture Torch-Pruning cannot trace), the "
                        "training outputs are kept, final.json gets slim_error, and the exit "
                        "status is 1")
    p.add_argument("--strict-data", action="store_true",
                   help="stop at the first image that cannot be read, naming it (otherwise it "
                        "is left out of its batch with a warning, and log.jsonl counts them)")
    p.add_argument("--timeout-min", type=finite_float, default=10.0,
                   help="DDP: minutes a process waits for the others (joining, or in a "
                        "collective) before the job ends with an error, e.g. when one hangs")
    p.add_argument("--stop-after-steps", type=int,
                   help="debugging: stop after this many steps, as if killed (nothing saved)")
    p.add_argument("--quiet", action="store_true", help="no config, per-epoch lines or progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    pre = OneLineErrorParser(prog="rmda-train", add_help=False)  # the preset sets the defaults
    pre.add_argument("--preset", choices=sorted(PRESETS), default="imagenet")
    p = parser()
    p.set_defaults(**PRESETS[pre.parse_known_args(argv)[0].preset])
    args = p.parse_args(argv)
    return resolve(args, p)


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill in the defaults that depend on other flags, and reject bad combinations."""
    if args.data is None:
        p.error(f"--data is required (an ImageFolder root with train/ and val/, or {DIGITS_SOURCE})")
    args.data = canonical_source(args.data)  # ./data and data/ are one run's data on --resume
    check_arch(args.arch)
    # torchvision models take RGB images, the digits CNN the 1x8x8 grayscale digits tensors
    if args.data == DIGITS_SOURCE and args.arch != DIGITS_ARCH:
        p.error(f"--arch {args.arch} takes RGB images, and --preset digits (--data "
                f"{DIGITS_SOURCE}) gives 1x8x8 grayscale tensors: train --arch {DIGITS_ARCH} on "
                "them, or write the digits as an ImageFolder of PNGs "
                "(rmda_fused.datasets.write_digits_imagefolder) and pass that as --data")
    if args.arch == DIGITS_ARCH and args.data != DIGITS_SOURCE:
        p.error(f"--arch {DIGITS_ARCH} takes the 1x8x8 digits tensors (--data {DIGITS_SOURCE}) "
                "only, not an ImageFolder tree: choose a torchvision model, e.g. --arch resnet18")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.amp == "auto":
        args.amp = "bf16" if args.device == "cuda" else "none"
    args.lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    args.momentum = DEFAULT_MOMENTUM[args.optimizer] if args.momentum is None else args.momentum
    if args.milestones is None:
        args.milestones = sorted({max(1, int(f * args.epochs)) for f in args.milestone_fractions})
    del args.milestone_fractions
    for name, ok, what in (
        ("epochs", args.epochs > 0, "positive"), ("batch_size", args.batch_size > 0, "positive"),
        ("image_size", args.image_size > 0, "positive"), ("lr", args.lr > 0, "positive"),
        ("momentum", 0 <= args.momentum <= 1, "in [0, 1]"), ("lam", args.lam >= 0, ">= 0"),
        ("gamma", args.gamma > 0, "positive"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
        ("label_smoothing", 0 <= args.label_smoothing <= 1, "in [0, 1]"),
        ("timeout_min", args.timeout_min > 0, "positive"),
    ):
        if not ok:
            p.error(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.fsdp and args.channels_last:
        p.error("--fsdp with --channels-last: fully_shard takes contiguous parameters only, "
                "and channels_last conv weights are not; leave out one of them")
    if (args.resume or args.export_slim) and not args.output:
        p.error("--resume and --export-slim need --output")
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train, and return the final metrics (``accuracy``, ``top5``,
    ``sparsity_z``, ``sparsity_W``, ``last_change``, ``unreadable_images``, ``seconds``; the
    ``slim`` report with --export-slim; ``stopped`` after --stop-after-steps). Raises SystemExit with a one-line message
    on bad input, a diverged run, a failed --export-slim, or a DDP timeout."""
    from . import distributed
    from .job import train

    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:  # a tiny model gains nothing from more threads on a busy CPU
        torch.set_num_threads(args.threads)
    try:
        with distributed.timeouts_end_the_job(args.timeout_min):
            info = distributed.setup(args.device, args.timeout_min, args.fsdp)
            world = info.world_size
            if args.batch_size % world:
                raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} "
                                 "processes")
            result = train(args, info)
            # every process past its last collective before any tears the group down: gloo
            # aborts a process whose peer closes the connection while it still reads from it
            distributed.barrier(info)
            return result
    finally:
        torch.set_num_threads(threads)
        distributed.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None, so that the exit status is 0 on success)."""
    run(argv)
