"""The selftest's correctness part: a backend's RMDA steps against a float64 statement of the
update, on small problems.

The float64 statement here (Float64Param, float64_prox, float64_coupled_prox) is written
from docs/algorithm.md alone and uses nothing of rmda_fused (no group views, no prox), so an
error in the package's shared code cannot hide in the reference as well. Each problem has,
per grouping, a conv weight whose input channel 1 is zero in W and in every gradient (a
group of norm exactly 0: the prox must give 0, not NaN), a linear weight and a bias;
gradients are a fixed direction plus noise, scaled so that some groups of z end exactly zero
and the others clearly not. With coupled groups, the linear weight's columns j and j + 6
share the conv's input channel j's group (groups across two tensors and two columns).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

from .optimizer import RMDA

GROUPINGS = ("input_channel", "output_channel", "elementwise", "coupled", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = tuple(f"{g} {d}" for d in DTYPES for g in GROUPINGS) + ("restart", "found_inf")
STEPS = 8
LR, MOMENTUM, LAM = 0.2, 0.5, 0.5
SMALL_SHAPES = ((8, 6, 3, 3), (10, 12), (8,))  # a conv weight, a linear weight, a bias
COUPLED_CHANNELS = 6  # coupled groups: column j of a weight is in group j % 6
# --full adds tensors that take the kernels' other paths: more than 64 output channels (a
# Triton tile splits into row chunks), and output-channel groups of 70K entries (larger than
# the CPU kernel's per-group cache budget)
LARGE_SHAPES = ((96, 40, 3, 3), (3, 70_000))
# group rms of the gradient direction, in units of lam: levels < 1 end zero, > 1 do not
LEVELS = torch.tensor([0.2, 3.0, 0.5, 2.0], dtype=torch.float64)
# max|library - reference| allowed, relative to max|reference|, for W, W0, V and A: fp32
# arithmetic over a few steps gathers a few ulp of 6e-8
REL_TOL = 1e-5
# A group whose reference norm lies within a relative 1e-6 of its threshold may be decided
# either way: the backends sum the norm in fp32, where one ulp is 6e-8 and the rounding of
# z and of the sum moves it by a few of those; such a group's mask entry is not compared.
# A group of norm exactly 0 is never in that band (the threshold is > 0): it must be zero.
MASK_BAND = 1e-6
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def _effective_grouping(grouping: str, ndim: int) -> str:
    # a tensor with fewer than 2 dims has no channels: a channel grouping leaves it unregularized
    channels = grouping.endswith("_channel") or grouping == "coupled"
    return "none" if channels and ndim < 2 else grouping


def _group_shape(shape: tuple[int, ...], grouping: str) -> tuple[int, ...]:
    """The shape of a per-group quantity (the gradient's level), broadcastable against the
    tensor."""
    ones = (1,) * (len(shape) - 1)
    if grouping in ("input_channel", "coupled"):
        return (1, shape[1]) + ones[1:]
    if grouping == "output_channel":
        return (shape[0],) + ones
    return shape if grouping == "elementwise" else (1,) * len(shape)


def float64_prox(z: Tensor, tau: float, grouping: str) -> tuple[Tensor, Tensor, Tensor, float]:
    """(prox of z, zero mask, norm per group, threshold): group LASSO with threshold
    tau * sqrt(group size); elementwise is the same rule with groups of one entry (L1)."""
    if grouping == "elementwise":
        norms = z.abs()
    else:
        group_dim = 1 if grouping == "input_channel" else 0
        norms = torch.linalg.vector_norm(
            z, dim=[d for d in range(z.dim()) if d != group_dim], keepdim=True)
    thr = tau * math.sqrt(z.numel() // norms.numel())
    zero = norms <= thr
    scale = torch.where(zero, 0.0, 1.0 - thr / torch.where(zero, 1.0, norms))  # 0, not 0/0
    return z * scale, zero.flatten(), norms.flatten(), thr


def float64_coupled_prox(zs: list[Tensor], taus: list[float]) -> list[tuple]:
    """Coupled group LASSO over the columns of several tensors, column j of every tensor in
    group j % COUPLED_CHANNELS: per tensor (prox of z, zero mask, norm and threshold per
    column), the threshold being tau * sqrt(entries of all the group's columns)."""
    sumsq, entries = torch.zeros(COUPLED_CHANNELS, dtype=torch.float64), [0] * COUPLED_CHANNELS
    for z in zs:
        for j in range(z.shape[1]):
            sumsq[j % COUPLED_CHANNELS] += float((z[:, j] ** 2).sum())
            entries[j % COUPLED_CHANNELS] += z[:, j].numel()
    out = []
    for z, tau in zip(zs, taus):
        group = torch.arange(z.shape[1]) % COUPLED_CHANNELS
        norms = sumsq.sqrt()[group]
        thr = tau * torch.tensor(entries, dtype=torch.float64).sqrt()[group]
        zero = norms <= thr
        scale = torch.where(zero, 0.0, 1.0 - thr / torch.where(zero, 1.0, norms))
        out.append((z * scale.reshape((1, -1) + (1,) * (z.dim() - 2)), zero, norms, thr))
    return out


class Float64Param:
    """One parameter's W, W0, V, t and A in float64, stepped as docs/algorithm.md states."""

    def __init__(self, value: Tensor, lr: float, momentum: float, lam: float, grouping: str):
        self.dtype = value.dtype
        self.W = value.detach().to("cpu", torch.float64).clone()
        self.W0 = self.W.clone()
        self.V = torch.zeros_like(self.W)
        self.t, self.A = 0, 0.0
        self.lr, self.c, self.lam = lr, momentum, lam
        self.grouping = _effective_grouping(grouping, value.dim())
        self.zero = self.norms = self.thr = None
        self.absmax = float(self.W.abs().max())  # largest |W| so far: bounds rounding gaps

    def dual_step(self, g: Tensor) -> tuple[Tensor, float]:
        """t, A and V; returns (z before the prox, tau)."""
        self.t += 1
        beta = math.sqrt(self.t)
        s = self.lr * beta
        self.A += s
        self.V = self.V + s * g
        return self.W0 - self.V / beta, self.lam * self.A / beta

    def step(self, g: Tensor) -> None:
        z, tau = self.dual_step(g)
        if self.grouping != "none":
            z, self.zero, self.norms, self.thr = float64_prox(z, tau, self.grouping)
        self.write(z)

    def write(self, z: Tensor) -> None:
        # the library rounds W to the parameter dtype once, when it writes it
        self.W = ((1 - self.c) * self.W + self.c * z).to(self.dtype).double()
        self.absmax = max(self.absmax, float(self.W.abs().max()))

    def restart(self) -> None:
        self.W0 = self.W.clone()
        self.V = torch.zeros_like(self.W)
        self.t, self.A = 0, 0.0


class Problem:
    """An RMDA optimizer on ``backend`` and its float64 mirror, fed the same gradients."""

    def __init__(self, backend: str, device: str, groupings: tuple[str, ...],
                 dtype: torch.dtype, large: bool, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        shapes = SMALL_SHAPES + (LARGE_SHAPES if large else ())
        self.params, self.refs, self.directions, groups = [], [], [], []
        for grouping in groupings:
            params = []
            for shape in shapes:
                w = 0.05 * torch.randn(shape, generator=self.gen, dtype=torch.float64)
                d = self._direction(shape, _effective_grouping(grouping, len(shape)))
                if shape == SMALL_SHAPES[0]:  # the conv: input channel 1 of norm exactly 0
                    w[:, 1] = d[:, 1] = 0.0
                p = torch.nn.Parameter(w.to(device=device, dtype=dtype))
                params.append(p)
                self.refs.append(Float64Param(p, LR, MOMENTUM, LAM, grouping))
                self.directions.append(d)
            self.params += params
            groups.append(dict(params=params, grouping=grouping))
            if grouping == "coupled":
                groups[-1]["channel_groups"] = [
                    torch.arange(p.shape[1]) % COUPLED_CHANNELS if p.dim() >= 2 else None
                    for p in params]
        self.optimizer = RMDA(groups, lr=LR, momentum=MOMENTUM, lam=LAM, backend=backend)

    def _direction(self, shape: tuple[int, ...], grouping: str) -> Tensor:
        group_shape = _group_shape(shape, grouping)
        levels = LEVELS[torch.arange(math.prod(group_shape)) % len(LEVELS)]
        signs = torch.randint(0, 2, shape, generator=self.gen, dtype=torch.float64) * 2 - 1
        return LAM * levels.reshape(group_shape) * signs

    def step(self, grad_scale: float = 1.0) -> None:
        """One step of both; the library gets the gradients times ``grad_scale`` (what a
        GradScaler hands it), the reference the unscaled ones."""
        coupled = []  # (reference, z, tau) of the coupled tensors: their prox comes last
        for p, ref, d in zip(self.params, self.refs, self.directions):
            noise = 0.1 * LAM * torch.randn(d.shape, generator=self.gen, dtype=torch.float64)
            # noise only where d is not 0, so the conv's zero input channel stays exactly 0;
            # g is rounded to the param dtype as the library gets it (before scaling)
            g = (d + noise * (d != 0)).to(p.dtype)
            p.grad = g.to(p.device) * grad_scale
            if ref.grouping == "coupled":
                coupled.append((ref, *ref.dual_step(g.double())))
            else:
                ref.step(g.double())
        if coupled:
            results = float64_coupled_prox([z for _, z, _ in coupled], [t for *_, t in coupled])
            for (ref, _, _), (z, ref.zero, ref.norms, ref.thr) in zip(coupled, results):
                ref.write(z)
        self.optimizer.step()

    def restart(self) -> None:
        self.optimizer.restart()
        for ref in self.refs:
            ref.restart()

    def zero_groups(self) -> list[int]:
        """[groups of z the reference has at zero, groups in all]."""
        masks = [ref.zero for ref in self.refs if ref.zero is not None]
        return [sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)]

    def differences(self) -> list[str]:
        """Every way the library's state differs from the reference's, as readable lines."""
        found = []
        for p, ref in zip(self.params, self.refs):
            state = self.optimizer.state[p]
            name = f"{ref.grouping} {tuple(p.shape)} {str(p.dtype).split('.')[-1]}"
            # W is rounded to the param dtype at each write; where the library's and the
            # reference's pre-rounded values straddle a rounding boundary they round to
            # neighbours 2u|W| apart, a gap that decays by (1 - c) per step: <= 2u max|W| / c
            rounding = 2 * UNIT_ROUNDOFF[p.dtype] * ref.absmax / ref.c
            for what, actual, expected, slack in (
                ("W", p, ref.W, rounding), ("W0", state["initial"], ref.W0, rounding),
                ("V", state["dual"], ref.V, 0.0),
                ("A", state["alpha"], torch.tensor(ref.A, dtype=torch.float64), 0.0),
            ):
                gap = float((actual.detach().cpu().double() - expected).abs().max())
                allowed = REL_TOL * float(expected.abs().max()) + slack
                if not gap <= allowed:  # a NaN gap fails too
                    found.append(f"{name}: {what} differs by {gap:.3g} (allowed {allowed:.3g})")
            if float(state["step"]) != ref.t:
                found.append(f"{name}: t is {float(state['step'])}, the reference's {ref.t}")
            if ref.zero is None:
                if "zero_mask" in state:
                    found.append(f"{name}: an unregularized tensor has a zero_mask")
                continue
            mask = state.get("zero_mask")
            if mask is None or mask.shape != ref.zero.shape:
                found.append(f"{name}: zero_mask is {mask if mask is None else mask.shape}, "
                             f"expected {ref.zero.numel()} groups")
                continue
            near = (ref.norms - ref.thr).abs() <= MASK_BAND * ref.thr
            wrong = (mask.cpu() != ref.zero) & ~near
            if wrong.any():
                found.append(f"{name}: zero_mask differs in {int(wrong.sum())} of "
                             f"{wrong.numel()} groups")
        return found


# (backend, device, large) -> the problem after its steps, and what the case itself found wrong
CaseRunner = Callable[[str, str, bool], "tuple[Problem, list[str]]"]


def _state_snapshot(problem: Problem) -> list[Tensor]:
    tensors = []
    for p in problem.params:
        tensors.append(p.detach().clone())
        tensors += [v.clone() for v in problem.optimizer.state[p].values()]
    return tensors


def _grouping_case(grouping: str, dtype: torch.dtype) -> CaseRunner:
    def run(backend: str, device: str, large: bool) -> tuple[Problem, list[str]]:
        problem = Problem(backend, device, (grouping,), dtype, large)
        for _ in range(STEPS):
            problem.step()
        return problem, []
    return run


def _restart_case(backend: str, device: str, large: bool) -> tuple[Problem, list[str]]:
    problem = Problem(backend, device, GROUPINGS, torch.float32, large)
    for k in range(STEPS):
        if k == STEPS // 2:
            problem.restart()
        problem.step()
    return problem, []


def _found_inf_case(backend: str, device: str, large: bool) -> tuple[Problem, list[str]]:
    """GradScaler's protocol: the optimizer gets ``grad_scale`` and ``found_inf``; a step with
    found_inf set must change nothing (the gradients then hold NaN), not even t."""
    problem = Problem(backend, device, ("input_channel",), torch.float32, large)
    optimizer, found = problem.optimizer, []
    for _ in range(STEPS // 2):
        problem.step()
    # 0-d fp32 tensors, as torch's GradScaler hands them over; a power of 2 scales exactly
    optimizer.grad_scale = torch.tensor(1024.0, device=device)
    optimizer.found_inf = torch.tensor(0.0, device=device)
    problem.step(grad_scale=1024.0)  # counts: the gradients are unscaled in the update
    before = _state_snapshot(problem)
    optimizer.found_inf = torch.tensor(1.0, device=device)
    for p in problem.params:
        p.grad = torch.full_like(p, math.nan)
    optimizer.step()
    if not all(torch.equal(a, b) for a, b in zip(before, _state_snapshot(problem))):
        found.append("a step with found_inf set changed W or the state")
    del optimizer.grad_scale, optimizer.found_inf
    problem.step()  # the reference skipped the found_inf step: t must agree
    return problem, found


def _case_runners() -> dict[str, CaseRunner]:
    runners = {f"{g} {d}": _grouping_case(g, dtype) for d, dtype in DTYPES.items()
               for g in GROUPINGS}
    runners.update(restart=_restart_case, found_inf=_found_inf_case)
    return runners


def check_backend(backend: str, device: str, large: bool = False) -> Iterator[dict]:
    """One result per case of :data:`CASES`, as it finishes: ``passed`` and, if not, what
    differed (a case that raises has failed with that error)."""
    for case, run in _case_runners().items():
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                problem, found = run(backend, device, large)
                found += problem.differences()
                zero_groups = problem.zero_groups()
            except Exception as exc:  # a crashing backend is a failed case, not a crash
                found, zero_groups = [f"raised {type(exc).__name__}: {exc}"], None
        yield dict(backend=backend, device=device, case=case, passed=not found,
                   differences=found[:8], zero_groups=zero_groups,
                   # e.g. a fused backend handing tensors to reference: say so
                   warnings=sorted({str(w.message) for w in caught}),
                   seconds=round(time.perf_counter() - start, 3))
