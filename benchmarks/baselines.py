"""What the benchmarks time: parameter lists with gradients, and the optimizers stepping them.

Shared by the pytest-benchmark suite and ``python -m benchmarks.overhead`` so that both time
exactly the same code. A :class:`Method` builds a ``step()`` callable over a list of parameters
(whose ``.grad`` is already set) and knows how many bytes that step must move at minimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from rmda_fused import RMDA, ProxSGD, available_backends, param_groups
from rmda_fused.functional import resolve_backend
from rmda_fused.grouping import norm_dims
from rmda_fused.batch import state_dtype

# Hyperparameters only need to be realistic enough that no path is skipped: lam > 0 so the
# prox runs on every regularized tensor, and small enough that random grads keep W finite.
LR = 0.01
RMDA_MOMENTUM = 0.1  # RMDA's c (docs/algorithm.md), not SGD's 0.9
SGD_MOMENTUM = 0.9
LAM = 1e-4
GROUPING = "input_channel"

# The cases the suite times: representative single tensors of ResNet-50 / ImageNet models,
# and a whole parameter list. torch's Linear weight is (out, in), so the 2048->1000
# classifier is (1000, 2048); the 1-D norm weight is unregularized (grouping "none").
TENSOR_CASES: dict[str, list[tuple[int, ...]]] = {
    "conv3x3_256x256": [(256, 256, 3, 3)],
    "conv1x1_2048x512": [(2048, 512, 1, 1)],
    "linear_1000x2048": [(1000, 2048)],
    "norm_2048": [(2048,)],
}
MODEL_CASES = ("resnet50",)
CASES = tuple(TENSOR_CASES) + MODEL_CASES


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- workloads -------------------------------------------------------------------------------

@dataclass
class Workload:
    """Fixed weights and random gradients; every method steps its own copy of the weights."""

    name: str
    weights: list[Tensor]
    grads: list[Tensor]
    regularized: list[bool]  # conv/linear weights: group LASSO; the rest: lam = 0

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)

    def fresh_params(self) -> list[Tensor]:
        # Clones, so that one method's drift (or zeroed groups) cannot change another's
        # timing; the grads are shared because no method writes them.
        params = []
        for w, g in zip(self.weights, self.grads):
            p = w.detach().clone().requires_grad_(True)
            p.grad = g
            params.append(p)
        return params


def _with_random_grads(name: str, weights: list[Tensor], regularized: list[bool],
                       seed: int = 0) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    # generated on the CPU in fp32 so every device and dtype sees the same numbers
    grads = [torch.randn(w.shape, generator=gen).to(w) for w in weights]
    return Workload(name, [w.detach() for w in weights], grads, regularized)


class TinyNet(nn.Sequential):
    """A few-kilobyte CNN for smoke runs: conv weights, a linear weight, biases and BN."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
        )


def build_model(name: str) -> nn.Module:
    """``tiny`` or any torchvision.models name (random init: nothing is downloaded)."""
    if name == "tiny":
        return TinyNet()
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def regularized_flags(model: nn.Module) -> list[bool]:
    """Per ``model.parameters()`` entry: is it in rmda_fused.param_groups' regularized group."""
    groups = param_groups(model, lam=LAM, grouping=GROUPING)
    regularized = {id(p) for g in groups if g["grouping"] != "none" for p in g["params"]}
    return [id(p) in regularized for p in model.parameters()]


def model_workload(name: str, device: str, dtype: torch.dtype) -> Workload:
    model = build_model(name).to(device=device, dtype=dtype)
    return _with_random_grads(name, list(model.parameters()), regularized_flags(model))


def conv_shape(numel: int, in_channels: int = 256, kernel: int = 3) -> tuple[int, ...]:
    """A conv weight (O, I, k, k) of about ``numel`` elements (I shrinks for tiny sizes)."""
    in_channels = max(1, min(in_channels, numel // (kernel * kernel)))
    out_channels = max(1, round(numel / (in_channels * kernel * kernel)))
    return (out_channels, in_channels, kernel, kernel)


def tensors_workload(name: str, shapes: list[tuple[int, ...]], device: str,
                     dtype: torch.dtype) -> Workload:
    """Synthetic tensors; those with ndim >= 2 are regularized, as conv/linear weights are."""
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device, dtype)
               for i, s in enumerate(shapes)]
    return _with_random_grads(name, weights, [len(s) >= 2 for s in shapes])


# -- methods ---------------------------------------------------------------------------------

@dataclass
class Method:
    label: str
    family: str  # "rmda" | "authors" | "proxsgd" | "sgd"
    build: Callable[[list[Tensor], list[bool]], Callable[[], None]]
    bytes_per_elem: Callable[[Tensor, bool], int]  # minimum traffic for one element of p
    backend: str | None = None  # the RMDA backend a "rmda" method runs on

    def bytes_per_step(self, params: list[Tensor], regularized: list[bool]) -> int:
        return sum(p.numel() * self.bytes_per_elem(p, r) for p, r in zip(params, regularized))


def _split(params: list[Tensor], regularized: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    return ([p for p, r in zip(params, regularized) if r],
            [p for p, r in zip(params, regularized) if not r])


def _groups(params: list[Tensor], regularized: list[bool]) -> list[dict]:
    """The two param groups of rmda_fused.param_groups, from flat lists (empty ones dropped)."""
    reg, plain = _split(params, regularized)
    groups = [dict(params=reg, lam=LAM, grouping=GROUPING),
              dict(params=plain, lam=0.0, grouping="none")]
    return [g for g in groups if g["params"]]


def _rmda_builder(backend: str, skip_nonfinite: bool = True):
    def build(params: list[Tensor], regularized: list[bool]) -> Callable[[], None]:
        opt = RMDA(_groups(params, regularized), lr=LR, momentum=RMDA_MOMENTUM, backend=backend,
                   skip_nonfinite=skip_nonfinite)
        return opt.step
    return build


def _rmda_bytes(p: Tensor, regularized: bool) -> int:
    # the floor of docs/algorithm.md, "Memory traffic": read g, W, W0 (param dtype), V (state dtype); write W, V
    v = torch.empty((), dtype=state_dtype(p.dtype)).element_size()
    return p.grad.element_size() + 3 * p.element_size() + 2 * v


def _authors_bytes(p: Tensor, regularized: bool) -> int:
    # the same algorithm, but their gradient_buffer is zeros_like(grad): V in the grad's dtype
    return 3 * p.grad.element_size() + 3 * p.element_size()


def _sgd_bytes(p: Tensor, regularized: bool) -> int:
    # read g, W, buf; write W, buf (torch keeps the momentum buffer in the param dtype)
    return p.grad.element_size() + 4 * p.element_size()


def _proxsgd_bytes(p: Tensor, regularized: bool) -> int:
    # plus the prox: read W for the group norms, then read and write W to scale it
    return _sgd_bytes(p, regularized) + (3 * p.element_size() if regularized else 0)


def _authors_prox_(p: Tensor, lam: float, alpha: float) -> None:
    # the authors' prox_glasso: threshold lam*alpha*sqrt(group size), relu/div per tensor
    # (their linalg.norm over 3 dims is vector_norm in current torch; same single pass)
    thr = lam * alpha * math.sqrt(p.numel() / p.shape[1])
    temp = torch.nn.functional.relu(torch.linalg.vector_norm(
        p, dim=norm_dims(p.ndim, GROUPING), keepdim=True).sub(thr))
    p.mul_(temp.div(temp.add(thr)))


def _authors_builder(params: list[Tensor], regularized: list[bool]) -> Callable[[], None]:
    """RMDA written as the authors' published optimizer is (github zihsyuan1214/rmda,
    RMDA/Optimizer/rmda.py): host-side scalars per group, then for every parameter a chain
    of separate tensor ops, each a full pass over the tensor, with p_tilde materialised."""
    groups = [dict(params=ps, lam=lam, iteration=0.0, accum=0.0, state={})
              for ps, lam in zip(_split(params, regularized), (LAM, 0.0)) if ps]

    @torch.no_grad()
    def step() -> None:
        for group in groups:
            beta = (group["iteration"] + 1) ** 0.5
            stepsize = LR * beta
            group["accum"] += stepsize
            alpha = group["accum"] / beta
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = group["state"].setdefault(p, {})
                if "initial_point" not in st:
                    st["initial_point"] = p.clone().detach()
                    st["gradient_buffer"] = torch.zeros_like(p.grad)
                buf = st["gradient_buffer"].add_(p.grad, alpha=stepsize)
                p_tilde = st["initial_point"].sub(buf, alpha=1 / beta)
                if group["lam"] != 0:
                    _authors_prox_(p_tilde, group["lam"], alpha)
                p.mul_(1 - RMDA_MOMENTUM).add_(p_tilde, alpha=RMDA_MOMENTUM)
            group["iteration"] += 1
    return step


def _sgd_builder(impl: str, prox: bool):
    def build(params: list[Tensor], regularized: list[bool]) -> Callable[[], None]:
        options = dict(lr=LR, momentum=SGD_MOMENTUM, **{impl: True})
        if prox:  # the library's baseline: torch SGD, then the group prox of each weight
            return ProxSGD(_groups(params, regularized), **options).step
        return torch.optim.SGD(params, **options).step
    return build


def _probe(method: Method, device: str, dtype: torch.dtype) -> str | None:
    """Why ``method`` cannot step ``dtype`` tensors on ``device`` (None: it can)."""
    try:
        # a conv-shaped weight, so that every code path (e.g. the 3-dim group norm) runs
        p = torch.zeros(4, 2, 3, 3, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        method.build([p], [True])()
    except Exception as exc:  # e.g. fused SGD without a kernel for this device/dtype
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def rmda_backends(device: str) -> dict[str, str | None]:
    """Every backend rmda_fused knows, mapped to None if it can step tensors on ``device``."""
    result = {}
    for name, reason in available_backends().items():
        if reason is None:
            try:
                resolve_backend(name, torch.device(device))
            except RuntimeError as exc:
                reason = str(exc)
        result[name] = reason
    return result


def all_methods() -> list[Method]:
    """Every method in report order, whether or not it runs here."""
    methods = []
    for name in available_backends():
        methods.append(Method(f"RMDA {name}", "rmda", _rmda_builder(name), _rmda_bytes, name))
        if name != "reference":  # what the default check of non-finite gradients costs
            methods.append(Method(f"RMDA {name}, skip_nonfinite=False", "rmda",
                                  _rmda_builder(name, False), _rmda_bytes, name))
    methods.append(Method("authors-style loop", "authors", _authors_builder, _authors_bytes))
    for impl in ("foreach", "fused"):
        methods.append(Method(f"ProxSGD {impl}", "proxsgd", _sgd_builder(impl, True),
                              _proxsgd_bytes))
    for impl in ("foreach", "fused"):
        methods.append(Method(f"SGD {impl}", "sgd", _sgd_builder(impl, False), _sgd_bytes))
    return methods


def methods_for(device: str, dtype: torch.dtype) -> tuple[list[Method], dict[str, str]]:
    """(methods that run on ``device``/``dtype``, {label: reason} for those that do not)."""
    backends = rmda_backends(device)
    runnable, skipped = [], {}
    for method in all_methods():
        reason = None
        if method.family == "rmda":
            reason = backends[method.backend]
        reason = reason or _probe(method, device, dtype)
        if reason:
            skipped[method.label] = reason
        else:
            runnable.append(method)
    return runnable, skipped


def reference_label(labels: list[str]) -> str:
    """The baseline ratios are taken against: fused SGD, else foreach SGD."""
    return "SGD fused" if "SGD fused" in labels else "SGD foreach"
