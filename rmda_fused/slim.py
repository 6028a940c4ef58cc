"""Turn a model whose input-channel columns are exactly zero into a smaller dense model.

After RMDA and ``optimizer.apply_prox_point()``, whole columns ``W[:, j, ...]`` of dense
convolutions and linear layers are exactly zero. Two removals are exact (eval mode):

1. **A channel every consumer ignores.** A channel of a coupled set
   (:mod:`rmda_fused.coupling`: e.g. ResNet's residual stream, read by many convs) whose
   coupled group is zero, i.e. every dense layer that reads it has a zero column for it, is
   removed from those consumers *and* from its producers (conv filters, BatchNorm channels,
   depthwise convs, residual adds, the gate of a squeeze-and-excitation block). A
   producer's BN bias still passes a constant through ReLU, but only into weights that are
   zero, so dropping it is exact. With ``param_groups(grouping="coupled")`` every zero group
   RMDA produces is such a channel. A set whose channels are *all* zero keeps one (a layer
   needs at least one channel; its consumers' columns for it are zero, so it changes
   nothing): the slim model counts those in ``slim_kept_channels``.
2. **A channel only some consumers ignore** (what independent input-channel groups leave,
   and an image channel the first conv ignores). Its producer must keep computing it; a
   consumer whose column for it is zero drops that input alone, and is wrapped in
   :class:`SelectInputs`, which gathers the channels it still reads
   (``select_inputs=True``). This trades a gather for fewer MACs: :func:`export_slim`
   measures both and keeps whichever is fastest, the dense model included.

Coupled sets through layers that mix channels (LayerNorm, GroupNorm, grouped convs,
attention) are left alone, so the result stays exact; :func:`compare` checks outputs.
Needs ``torch-pruning`` (``pip install torch-pruning``). An architecture whose graph
Torch-Pruning cannot trace (e.g. ShuffleNet's channel shuffle, a reshape it cannot map
channels through) raises :class:`SlimError` naming the model and the step that failed.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .coupling import (CoupledSet, TorchPruningError, coupled_sets, dependency_graph,
                       import_torch_pruning, is_dense_consumer, torch_pruning_step)
from .grouping import zero_group_mask

__all__ = ["SelectInputs", "SlimError", "slim", "with_select_inputs", "compare", "measure",
           "export_slim", "latencies_ms", "pass_times_ms", "EXACT_RTOL"]

SlimError = TorchPruningError

# a slim model is exact when max |output difference| <= EXACT_RTOL * max |dense output|:
# removing zero columns only changes the order of fp32 sums
EXACT_RTOL = 1e-5


class SelectInputs(nn.Module):
    """``layer(x[:, keep])`` (``x[..., keep]`` for a linear layer): a consumer that reads
    only the input channels its weights do not ignore."""

    def __init__(self, layer: nn.Module, keep: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.dim = -1 if isinstance(layer, nn.Linear) else 1
        self.register_buffer("keep", keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.index_select(self.dim, self.keep))


def _zero_inputs(module: nn.Module) -> Tensor:
    """One bool per input channel (column) of a conv/linear weight: is W[:, i, ...] all 0?"""
    return zero_group_mask(module.weight.detach(), "input_channel").cpu()


def _removable(coupled: CoupledSet) -> tuple[list[int], int]:
    """The channels (root indices) of a coupled set that every dense consumer ignores, and
    how many such channels stay because the set would otherwise be empty (0 or 1)."""
    read = torch.zeros(coupled.size, dtype=torch.bool)
    for module, columns, channels in coupled.columns:
        read[channels[~_zero_inputs(module)[columns]]] = True
    ignored = (~read).nonzero().flatten().tolist()
    if len(ignored) == coupled.size:
        return ignored[1:], 1  # a layer keeps >= 1 channel
    return ignored, 0


def with_select_inputs(slimmed: nn.Module) -> nn.Module:
    """A copy of a model ``slim(..., select_inputs=False)`` returned, its consumers with zero
    columns left wrapped in :class:`SelectInputs` (what ``select_inputs=True`` returns)."""
    selecting = copy.deepcopy(slimmed)
    selecting.slim_selected_inputs = _select_inputs(selecting)
    return selecting


@torch.no_grad()
def _select_inputs(model: nn.Module) -> int:
    """Wrap every consumer with zero input groups left in :class:`SelectInputs`; returns how
    many input channels were dropped this way."""
    tp = import_torch_pruning()
    dropped = 0
    for name, module in list(model.named_modules()):
        if not name or not is_dense_consumer(module):
            continue
        zero = _zero_inputs(module)
        drop = zero.nonzero().flatten().tolist()
        if not drop:
            continue
        if len(drop) == len(zero):
            drop = drop[1:]  # keep one input; its weights are zero, so the layer yields its bias
            if not drop:
                continue
        keep = (~torch.isin(torch.arange(len(zero)), torch.tensor(drop))).nonzero().flatten()
        prune = tp.prune_linear_in_channels if isinstance(module, nn.Linear) else tp.prune_conv_in_channels
        prune(module, drop)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, SelectInputs(module, keep.to(module.weight.device)))
        dropped += len(drop)
    return dropped


def slim(model: nn.Module, example_inputs: Tensor, select_inputs: bool = True) -> nn.Module:
    """A smaller dense copy of ``model`` (eval mode) computing the same function; ``model``
    is left untouched. ``example_inputs``: a batch the model accepts (traced once).

    The copy records ``slim_removed_channels`` (channels removed with their producers),
    ``slim_kept_channels`` (zero channels kept because their whole set was zero) and
    ``slim_selected_inputs`` (input channels dropped by :class:`SelectInputs` wrappers)."""
    model = copy.deepcopy(model).eval()  # eval: BN uses its running statistics, as exported
    traced = dependency_graph(model, example_inputs)
    # decide on the untouched model, then prune: coupled sets are disjoint, so the root
    # indices of one set stay valid while another is pruned
    plans, kept = [], 0
    for coupled in coupled_sets(traced):
        channels, kept_here = _removable(coupled)
        kept += kept_here
        if channels:
            plans.append((coupled, channels))
    with torch_pruning_step(model, "removing the channels every consumer ignores"):
        for coupled, channels in plans:
            group = traced.graph.get_pruning_group(coupled.root, coupled.handler, channels)
            group.prune(record_history=False)
    model.slim_removed_channels = sum(len(c) for _, c in plans)
    model.slim_kept_channels = kept
    model.slim_selected_inputs = _select_inputs(model) if select_inputs else 0
    return model


@torch.inference_mode()
def pass_times_ms(models: dict[str, nn.Module], inputs: Tensor, repeats: int = 20,
                  warmup: int = 3, clock: Callable[[], float] = time.perf_counter
                  ) -> dict[str, list[float]]:
    """Time of each of ``repeats`` forward passes of each model, in milliseconds, by
    ``clock`` (wall time; ``time.process_time``, this process's CPU time, is what other
    processes on a shared machine disturb least, with one torch thread). The models take
    turns, pass by pass, so a change in the load of the machine hits all of them."""
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            sync()
            start = clock()
            model(inputs)
            sync()
            if i >= warmup:
                times[name].append((clock() - start) * 1e3)
    return times


def latencies_ms(models: dict[str, nn.Module], inputs: Tensor, repeats: int = 20,
                 warmup: int = 3) -> dict[str, float]:
    """Median wall time of one forward pass of each model (:func:`pass_times_ms`), in ms."""
    return {name: statistics.median(t)
            for name, t in pass_times_ms(models, inputs, repeats, warmup).items()}


def _size(model: nn.Module, one_input: Tensor) -> tuple[float, int]:
    from torch_pruning.utils import count_ops_and_params

    macs, params = count_ops_and_params(model, one_input)  # MACs per image
    return float(macs), int(params)


@torch.no_grad()
def measure(dense: nn.Module, models: dict[str, nn.Module], inputs: Tensor,
            repeats: int = 20, clock: Callable[[], float] = time.perf_counter
            ) -> dict[str, dict[str, Any]]:
    """Parameters, MACs per image, latency (median and fastest of :func:`pass_times_ms`)
    and output difference from ``dense`` on ``inputs``, of ``dense`` (key ``"dense"``) and
    of each of ``models``; a model is ``exact`` when its difference is <= ``EXACT_RTOL``
    times the largest dense output."""
    models = {"dense": dense.eval(), **{name: m.eval() for name, m in models.items()}}
    ref = dense(inputs)
    times = pass_times_ms(models, inputs, repeats, clock=clock)
    scale = float(ref.abs().max())
    result = {}
    for name, model in models.items():
        macs, params = _size(model, inputs[:1])
        diff = float((model(inputs) - ref).abs().max())
        result[name] = dict(
            params=params, macs=macs, latency_ms=statistics.median(times[name]),
            latency_ms_min=min(times[name]), max_abs_diff=diff,
            max_abs_output=scale, exact=model is dense or diff <= EXACT_RTOL * scale,
            removed_channels=getattr(model, "slim_removed_channels", 0),
            kept_channels=getattr(model, "slim_kept_channels", 0),
            selected_inputs=getattr(model, "slim_selected_inputs", 0))
    return result


def _before_after(before: dict[str, Any], after: dict[str, Any], inputs: Tensor) -> dict[str, Any]:
    return dict(
        params_before=before["params"], params_after=after["params"],
        macs_before=before["macs"], macs_after=after["macs"],
        latency_ms_before=before["latency_ms"], latency_ms_after=after["latency_ms"],
        latency_batch=len(inputs), latency_device=str(inputs.device),
        max_abs_diff=after["max_abs_diff"], max_abs_output=after["max_abs_output"],
        removed_channels=after["removed_channels"], kept_channels=after["kept_channels"],
        selected_inputs=after["selected_inputs"])


def compare(original: nn.Module, slimmed: nn.Module, inputs: Tensor, repeats: int = 20) -> dict[str, Any]:
    """Parameters, MACs per image and latency of both models, and how far their outputs
    differ on ``inputs`` (both in eval mode)."""
    measured = measure(original, {"slim": slimmed}, inputs, repeats)
    return _before_after(measured["dense"], measured["slim"], inputs)


def export_slim(model: nn.Module, inputs: Tensor, path: str | Path, repeats: int = 20) -> dict[str, Any]:
    """Save to ``path`` (``torch.save`` of the whole model; load it with
    ``torch.load(path, weights_only=False)``) the fastest exact one of: the slim model
    without :class:`SelectInputs` (``"slim"``), with them (``"slim_select_inputs"``, when
    some zero columns are left for them) and ``model`` itself (``"dense"``), timed on
    ``inputs``'s device; its report goes beside it as JSON (``<path>.json``).

    The report: ``chosen``, ``candidates`` (size, latency, output difference of each), and
    the :func:`compare` keys for the chosen model. So the saved model is never slower than
    ``model`` in this measurement (median of ``repeats`` passes, on ``inputs``'s device);
    a candidate whose outputs are not exact is never saved."""
    path = Path(path)
    plain = slim(model, inputs[:1], select_inputs=False)
    candidates = {"slim": plain}
    selecting = with_select_inputs(plain)
    if selecting.slim_selected_inputs:  # else it is the same model as "slim"
        candidates["slim_select_inputs"] = selecting
    measured = measure(model, candidates, inputs, repeats)
    exact = [name for name, m in measured.items() if m["exact"]]
    chosen = min(exact, key=lambda name: measured[name]["latency_ms"])
    saved = model if chosen == "dense" else candidates[chosen]
    report = dict(chosen=chosen, candidates=measured,
                  **_before_after(measured["dense"], measured[chosen], inputs))
    torch.save(saved, path)
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def describe(report: dict[str, Any]) -> str:
    """One paragraph for humans."""
    r = report
    text = (f"slim model: params {r['params_before']:,} -> {r['params_after']:,} "
            f"({r['params_after'] / r['params_before']:.1%}), MACs/image {r['macs_before']:,.0f} -> "
            f"{r['macs_after']:,.0f} ({r['macs_after'] / max(r['macs_before'], 1):.1%}), latency "
            f"{r['latency_ms_before']:.2f} -> {r['latency_ms_after']:.2f} ms (batch "
            f"{r['latency_batch']}, {r['latency_device']}); {r['removed_channels']} channels removed "
            f"({r['kept_channels']} zero channels kept, their whole set being zero), "
            f"{r['selected_inputs']} more inputs dropped by consumers; max |output difference| "
            f"{r['max_abs_diff']:.2e} (outputs up to {r['max_abs_output']:.2e})")
    if "chosen" in r:
        timings = ", ".join(f"{name} {c['latency_ms']:.2f} ms{'' if c['exact'] else ' (not exact)'}"
                            for name, c in r["candidates"].items())
        text += f"; saved the fastest exact model, {r['chosen']!r} ({timings})"
    return text
