"""A whole run: set up, resume, train epoch by epoch, checkpoint, report, export."""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .. import RMDA, IdentificationTracker, available_backends
from ..structure import group_sparsity
from . import checkpoint, data as data_mod, distributed, fsdp, loop, optim, report
from . import sharded_checkpoint
from .distributed import Dist
from .models import build_model

FINAL = "final.json"


def _structure(optimizer, tracker) -> dict[str, Any]:
    flips = tracker.flips
    return dict(sparsity_z=group_sparsity(optimizer, "z").fraction,
                sparsity_W=group_sparsity(optimizer, "W").fraction,
                flips=flips[-1] if flips else 0, last_change=tracker.last_change)


def _prepare_output(output: str, say) -> None:
    """Create the run directory, check that files can be written in it, and remove the
    temporary checkpoint a run killed while saving left there."""
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):  # a read-only filesystem, no permission
            pass
    except OSError as exc:  # also a file where the directory (or one above it) should be
        raise SystemExit(f"--output {output}: cannot write the run directory there: "
                         f"{exc.strerror or exc}") from None
    removed = checkpoint.remove_temporaries(output) + sharded_checkpoint.remove_temporaries(output)
    for stale in removed:
        say(f"removed {stale}, a checkpoint whose writing was interrupted")


def _resume_state(args: Any, info: Dist, num_classes: int) -> dict[str, Any] | None:
    if not args.output:
        return None
    plain, sharded = checkpoint.path(args.output), sharded_checkpoint.path(args.output)
    # rank 0 decides for all
    exists = distributed.broadcast_object(info, (plain.exists(), sharded.exists()))
    if any(exists) and not args.resume:
        raise SystemExit(f"--output {args.output} already holds a checkpoint: pass --resume to "
                         "continue that run, or choose another --output")
    plain_exists, sharded_exists = exists
    if plain_exists if args.fsdp else sharded_exists:  # the other kind's checkpoint
        written, how = (plain, "without") if args.fsdp else (sharded, "with")
        raise SystemExit(f"--resume: {written} was written by a run {how} --fsdp; resume it "
                         f"{how} --fsdp (its tensors are laid out for that)")
    if args.fsdp:
        return sharded_checkpoint.load(sharded, args, num_classes) if sharded_exists else None
    return checkpoint.load(plain, args, info, num_classes) if plain_exists else None


def train(args: Any, info: Dist) -> dict[str, Any]:
    say = report.printer(args.quiet, info.is_main)
    if args.output and info.is_main:
        _prepare_output(args.output, say)
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts them)
    data = data_mod.build(args, info)
    model = build_model(args.arch, data.num_classes).to(info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # coupled groups trace the model once, on a real batch (rank 0's and every rank's alike)
    example = next(iter(data.val))[0][:1].to(info.device) if args.grouping == "coupled" else None
    # --fsdp: the groups are made (coupled ones traced) on the model before it is sharded
    wrap = (lambda groups: fsdp.shard(model, info, groups)) if args.fsdp else None
    optimizer, scheduler = optim.build(args, model, example, wrap)
    if isinstance(optimizer, RMDA):
        say(f"RMDA backend: {', '.join(dict.fromkeys(optimizer.backend_names()))} "
            f"(rmda_fused.available_backends(): {available_backends()})")
    scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp == "fp16")
    tracker = IdentificationTracker(optimizer)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    torch.manual_seed(args.seed + info.rank)  # each process its own augmentation stream

    state = _resume_state(args, info, data.num_classes)
    kind = sharded_checkpoint if args.fsdp else checkpoint
    done = kind.restore(state, info, model, optimizer, scheduler, scaler, tracker) if state else 0
    del state
    log = report.JsonLog(args.output, done) if args.output and info.is_main else None

    say(report.config_text(args, dict(world_size=info.world_size, device=info.device,
                                      train_images=data.train_size, val_images=data.val_size,
                                      classes=data.num_classes, resumed_after_epoch=done)))
    if done:
        say(f"resumed from {kind.path(args.output)} after epoch {done}")

    train_model: nn.Module = model
    if info.enabled and not args.fsdp:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    start = time.perf_counter()
    steps_left = args.stop_after_steps
    bar = None
    if info.is_main and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=max(args.epochs - done, 0) * len(data.train), desc="training", unit="step",
                   file=sys.stderr, leave=False, dynamic_ncols=True)
    for epoch in range(done + 1, args.epochs + 1):
        data.set_epoch(epoch)
        if bar is not None:
            bar.set_description(f"epoch {epoch}/{args.epochs}")
        lr, momentum = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"]
        stats = loop.train_epoch(args, info, train_model, data.train, optimizer, scaler, loss_fn,
                                 bar, steps_left)
        if steps_left is not None:
            steps_left -= stats["steps"]
            if steps_left <= 0:  # --stop-after-steps: as if killed here, nothing saved
                if bar is not None:
                    bar.close()
                say(f"stopped after {args.stop_after_steps} steps (--stop-after-steps), in epoch {epoch}")
                return dict(stopped=True, epoch=epoch - 1)
        diverged = _divergence(info, model, optimizer, stats["train_loss"])
        if diverged:
            if bar is not None:
                bar.close()
            _stop_diverged(args, info, log, epoch, diverged)
        scheduler.step()  # after the epoch: lr *= gamma (and RMDA restarts) at a milestone
        tracker.update(epoch)
        top1, top5 = loop.evaluate(args, info, model, data.val)
        record = dict(epoch=epoch, lr=float(lr), momentum=float(momentum), **stats,
                      val_top1=top1, val_top5=top5, **_structure(optimizer, tracker),
                      unreadable_images=_left_out(info, data, f"epoch {epoch}"),
                      elapsed_s=time.perf_counter() - start)
        if args.output and args.fsdp:
            sharded_checkpoint.save(args, info, epoch, model, optimizer, scheduler, scaler,
                                    tracker, data.num_classes)
            if info.is_main:
                log.append(record)
        elif args.output:
            payload = checkpoint.payload(args, info, epoch, model, optimizer, scheduler, scaler,
                                         tracker, data.num_classes)
            if info.is_main:
                checkpoint.save(args.output, payload)
                log.append(record)
            del payload
        say(report.epoch_line(record))
        if bar is not None:
            bar.set_postfix(acc=f"{top1:.3f}", z=f"{record['sparsity_z']:.0%}")
    if bar is not None:
        bar.close()
    return _finish(args, info, model, optimizer, tracker, data, log, say, start)


def _divergence(info: Dist, model: nn.Module, optimizer, train_loss: float) -> str | None:
    """Why training cannot go on after this epoch (its loss, or a weight or optimizer state
    tensor, is not finite), or None; every process gets the same answer."""
    broken = loop.nonfinite_tensors(model, optimizer)
    broken_anywhere = distributed.all_reduce_sum(info, [float(len(broken))])[0]
    reasons = [f"the mean training loss is {train_loss}"] if not math.isfinite(train_loss) else []
    if broken:
        more = ", ..." if len(broken) > 3 else ""
        reasons.append(f"{len(broken)} tensors hold NaN or inf ({', '.join(broken[:3])}{more})")
    elif broken_anywhere:
        reasons.append("another process's weights or optimizer state hold NaN or inf")
    return "; ".join(reasons) or None


def _stop_diverged(args, info: Dist, log, epoch: int, reason: str) -> NoReturn:
    """Record the divergence (log.jsonl, and a final.json with no accuracy or sparsity to
    mistake for a result) and stop with exit status 1, the checkpoint left as it was."""
    last_good = epoch - 1  # every finished epoch before this one was saved
    if args.output and info.is_main:
        log.append(dict(epoch=epoch, diverged=True, reason=reason))
        _write_final(args.output, dict(diverged=True, epoch=epoch, reason=reason,
                                       last_good_epoch=last_good or None))
    if not args.output:
        kept = "nothing is saved without --output"
    elif last_good:
        where = (sharded_checkpoint if args.fsdp else checkpoint).path(args.output)
        kept = f"{where} keeps epoch {last_good}, the last good one"
    else:
        kept = "no epoch finished with finite values, so no checkpoint was saved"
    raise SystemExit(f"training diverged in epoch {epoch}: {reason}; {kept}. Try a lower --lr "
                     "in a new run: --resume keeps the run's --lr")


def _left_out(info: Dist, data, when: str) -> int:
    """Warn about the images this process could not read since the last call; returns how
    many there were over all processes."""
    mine = data.take_unreadable()
    if mine:
        rank = f"rank {info.rank}, " if info.enabled else ""
        warnings.warn(f"{rank}{when}: left out {len(mine)} image(s) that cannot be read, e.g. "
                      f"{mine[0].path} ({mine[0].error}); --strict-data stops at the first instead",
                      RuntimeWarning, stacklevel=2)
    return int(distributed.all_reduce_sum(info, [float(len(mine))])[0])


def _write_final(output: str | Path, final: dict[str, Any]) -> None:
    (Path(output) / FINAL).write_text(json.dumps(final, indent=2) + "\n")


def _finish(args, info, model, optimizer, tracker, data, log, say, start) -> dict[str, Any]:
    """W <- z (RMDA), final metrics, plots, and the slim export."""
    if isinstance(optimizer, RMDA):
        optimizer.apply_prox_point()  # W <- z: the exactly structured model
    top1, top5 = loop.evaluate(args, info, model, data.val)
    structure = _structure(optimizer, tracker)
    final = dict(accuracy=top1, top5=top5, sparsity_z=structure["sparsity_z"],
                 sparsity_W=structure["sparsity_W"], last_change=tracker.last_change,
                 unreadable_images=_left_out(info, data, "final evaluation"),
                 seconds=time.perf_counter() - start)
    what = "after apply_prox_point()" if isinstance(optimizer, RMDA) else "at the end"
    say(f"\n{what}, in {final['seconds']:.1f} s: test accuracy {top1:.4f} (top-5 {top5:.4f}), "
        f"group sparsity z {final['sparsity_z']:.1%} = W {final['sparsity_W']:.1%}, "
        f"z pattern last changed at epoch {final['last_change']}")
    say(group_sparsity(optimizer, "W", model=model))
    if args.fsdp:  # the whole model on rank 0, unsharded, for model_final.pt and the export
        whole = fsdp.full_model_state(model)
        if info.is_main:
            model = build_model(args.arch, data.num_classes).to(info.device)
            model.load_state_dict(whole)
        del whole
    if args.output and info.is_main:
        out = Path(args.output)
        torch.save(dict(model=model.state_dict(), arch=args.arch, num_classes=data.num_classes),
                   out / "model_final.pt")
        _write_final(out, final)
        for path in report.plot(log.records(), out):
            say(f"wrote {path}")
    slim_error = None
    if args.export_slim and info.is_main:
        try:
            final["slim"] = _export_slim(args, info, model, data, say)
        except Exception as exc:  # whatever the export hits, the trained model is saved above
            slim_error = f"--export-slim failed for --arch {args.arch}: {type(exc).__name__}: {exc}"
            _write_final(args.output, {**final, "slim_error": slim_error})
    distributed.barrier(info)  # the others wait for rank 0's files before the group closes
    if slim_error:
        saved = (sharded_checkpoint if args.fsdp else checkpoint).path(args.output).name
        raise SystemExit(f"{slim_error}. Training finished: its outputs ({saved}, "
                         f"model_final.pt, final.json) are in {args.output}; no slim.pt")
    return final


def _export_slim(args, info, model, data, say) -> dict[str, Any]:
    from ..slim import describe, export_slim

    x, _ = next(iter(data.val))  # real images: the equivalence is checked where it matters
    model.eval()
    result = export_slim(model, x[:8].to(info.device), Path(args.output) / "slim.pt")
    say(describe(result))
    say(f"wrote {Path(args.output) / 'slim.pt'} and slim.pt.json")
    return result
