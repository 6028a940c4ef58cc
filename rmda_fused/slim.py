"""Turn a model whose input-channel groups are exactly zero into a smaller dense model.

After RMDA and ``optimizer.apply_prox_point()``, whole input-channel groups ``W[:, i, ...]``
of convolutions and linear layers are exactly zero. Two removals are exact (eval mode):

1. **A channel every consumer ignores.** If every conv/linear that reads channel c has a
   zero weight group for it, the value of c does not matter: c is removed from those
   consumers *and* from its producers (conv filters, BatchNorm channels, residual adds).
   What reads c, and which layers produce it jointly (ResNet's residual stream is shared by
   many convs), comes from Torch-Pruning's dependency graph: a coupled set is removed only
   where all of its consumers ignore the channel. A producer's BN bias still passes a
   constant through ReLU, but only into weights that are zero, so dropping it is exact.
2. **A channel only some consumers ignore.** Its producer must keep computing it; a consumer
   whose weights for it are zero drops the input channel alone, and is wrapped in
   :class:`SelectInputs`, which gathers the channels it still reads (``select_inputs=True``).
   This trades a gather for fewer MACs: :func:`export_slim` measures whether it pays.

Coupled sets through layers that mix channels (LayerNorm, GroupNorm, grouped or depthwise
convs, attention) are left alone, so the result stays exact; :func:`compare` checks outputs.
Needs ``torch-pruning`` (``pip install torch-pruning``). An architecture whose graph
Torch-Pruning cannot trace (e.g. ShuffleNet's channel shuffle, a reshape it cannot map
channels through) raises :class:`SlimError` naming the model and the step that failed.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .grouping import zero_group_mask

__all__ = ["SelectInputs", "SlimError", "slim", "compare", "export_slim"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SlimError(RuntimeError):
    """Torch-Pruning failed on this model (the model itself is untouched)."""


@contextmanager
def _torch_pruning(model: nn.Module, step: str) -> Iterator[None]:
    """SlimError naming the model's class and ``step`` for whatever Torch-Pruning raises
    (on ShuffleNetV2, a bare ZeroDivisionError from deep inside its graph code)."""
    try:
        yield
    except Exception as exc:
        raise SlimError(f"Torch-Pruning failed on {type(model).__name__} while {step}: "
                        f"{type(exc).__name__}: {exc}") from exc


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


def _is_dense_consumer(module: nn.Module) -> bool:
    # grouped/depthwise convs tie input to output channels; transposed convs lay weights out
    # as (I, O, k...): neither has the input-channel groups RMDA regularizes
    return isinstance(module, nn.Linear) or (
        isinstance(module, _CONVS) and module.groups == 1 and not module.transposed)


def _zero_inputs(module: nn.Module) -> Tensor:
    """One bool per input channel (column) of a conv/linear weight: is W[:, i, ...] all 0?"""
    return zero_group_mask(module.weight.detach(), "input_channel").cpu()


def _removable(graph: Any, group: Any) -> list[int]:
    """Channels (root indices) of one coupled set that every consumer ignores; [] if none,
    or if the set passes through a layer whose channels are not independent."""
    from torch_pruning.ops import OPTYPE

    channelwise = {OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.BN, OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE,
                   OPTYPE.CONCAT, OPTYPE.SPLIT}
    size = len(group[0].idxs)
    ignored = torch.ones(size, dtype=torch.bool)
    consumers = 0
    for item in group:
        node, module = item.dep.target, item.dep.target.module
        if node.type not in channelwise or (node.type == OPTYPE.CONV and not _is_dense_consumer(module)):
            return []
        if node.type in (OPTYPE.CONV, OPTYPE.LINEAR) and graph.is_in_channel_pruning_fn(item.dep.handler):
            consumers += 1
            zero = _zero_inputs(module)
            for idx, root in zip(item.idxs, item.root_idxs):
                if not zero[idx]:
                    ignored[root] = False
    if consumers == 0:  # e.g. the classifier's outputs: they are the model's output
        return []
    channels = ignored.nonzero().flatten().tolist()
    return channels[1:] if len(channels) == size else channels  # a layer keeps >= 1 channel


@torch.no_grad()
def _select_inputs(model: nn.Module) -> int:
    """Wrap every consumer with zero input groups left in :class:`SelectInputs`; returns how
    many input channels were dropped this way."""
    import torch_pruning as tp

    dropped = 0
    for name, module in list(model.named_modules()):
        if not name or not _is_dense_consumer(module):
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
    is left untouched. ``example_inputs``: a batch the model accepts (traced once)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()  # eval: BN uses its running statistics, as exported
    # Torch-Pruning traces the autograd graph
    with torch.enable_grad(), _torch_pruning(model, "tracing its channel dependency graph"):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    # decide on the untouched model, then prune: coupled sets are disjoint, so the root
    # indices of one set stay valid while another is pruned
    plans = []
    for group in graph.get_all_groups():
        channels = _removable(graph, group)
        if channels:
            plans.append((group[0].dep.target.module, group[0].dep.handler, channels))
    with _torch_pruning(model, "removing the channels every consumer ignores"):
        for module, handler, channels in plans:
            graph.get_pruning_group(module, handler, channels).prune(record_history=False)
    model.slim_removed_channels = sum(len(c) for _, _, c in plans)
    model.slim_selected_inputs = _select_inputs(model) if select_inputs else 0
    return model


@torch.inference_mode()
def latency_ms(model: nn.Module, inputs: Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        model(inputs)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _size(model: nn.Module, one_input: Tensor) -> tuple[float, int]:
    from torch_pruning.utils import count_ops_and_params

    macs, params = count_ops_and_params(model, one_input)  # MACs per image
    return float(macs), int(params)


@torch.no_grad()
def compare(original: nn.Module, slimmed: nn.Module, inputs: Tensor, repeats: int = 20) -> dict[str, Any]:
    """Parameters, MACs per image and latency of both models, and how far their outputs
    differ on ``inputs`` (both in eval mode)."""
    original.eval(), slimmed.eval()
    ref, out = original(inputs), slimmed(inputs)
    macs_before, params_before = _size(original, inputs[:1])
    macs_after, params_after = _size(slimmed, inputs[:1])
    return dict(
        params_before=params_before, params_after=params_after,
        macs_before=macs_before, macs_after=macs_after,
        latency_ms_before=latency_ms(original, inputs, repeats),
        latency_ms_after=latency_ms(slimmed, inputs, repeats),
        latency_batch=len(inputs), latency_device=str(inputs.device),
        max_abs_diff=float((ref - out).abs().max()), max_abs_output=float(ref.abs().max()),
        removed_channels=getattr(slimmed, "slim_removed_channels", 0),
        selected_inputs=getattr(slimmed, "slim_selected_inputs", 0),
    )


def export_slim(model: nn.Module, inputs: Tensor, path: str | Path, repeats: int = 20,
                select_inputs: bool = True) -> dict[str, Any]:
    """Slim ``model``, save it whole with ``torch.save`` to ``path`` (load it with
    ``torch.load(path, weights_only=False)``; it may contain :class:`SelectInputs`) and its
    :func:`compare` report as JSON beside it (``<path>.json``). Returns the report."""
    path = Path(path)
    slimmed = slim(model, inputs[:1], select_inputs=select_inputs)
    report = compare(model, slimmed, inputs, repeats)
    torch.save(slimmed, path)
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def describe(report: dict[str, Any]) -> str:
    """One paragraph for humans."""
    r = report
    return (f"slim model: params {r['params_before']:,} -> {r['params_after']:,} "
            f"({r['params_after'] / r['params_before']:.1%}), MACs/image {r['macs_before']:,.0f} -> "
            f"{r['macs_after']:,.0f} ({r['macs_after'] / max(r['macs_before'], 1):.1%}), latency "
            f"{r['latency_ms_before']:.2f} -> {r['latency_ms_after']:.2f} ms (batch "
            f"{r['latency_batch']}, {r['latency_device']}); {r['removed_channels']} channels removed, "
            f"{r['selected_inputs']} more inputs dropped by consumers; max |output difference| "
            f"{r['max_abs_diff']:.2e} (outputs up to {r['max_abs_output']:.2e})")
