"""An independent float64 statement of RMDA (Algorithm 1 of the paper, as docs/algorithm.md
states it), for testing.

Written from the algorithm alone: nothing here imports rmda_fused. Plain torch float64 code, one
parameter at a time, loops over groups for clarity rather than speed.

Each step of the update is its own small method so that tests can build *mutants* (a subclass
overriding exactly one method with one deliberate error) and prove that the comparison
against the library catches that error.
"""
from __future__ import annotations

import math

import torch

GROUPINGS = ("input_channel", "output_channel", "elementwise", "none")  # coupled: own driver


def group_slices(shape: tuple[int, ...], grouping: str) -> list[tuple]:
    """Index tuples selecting each group of a tensor of ``shape`` (channel groupings only)."""
    if grouping == "input_channel":  # W[:, i, ...]
        return [(slice(None), i) for i in range(shape[1])]
    if grouping == "output_channel":  # W[o, ...]
        return [(o,) for o in range(shape[0])]
    raise ValueError(grouping)


class ParamState:
    """Float64 state of one parameter: W, W0, V, t, A, plus the last step's z and masks."""

    def __init__(self, value: torch.Tensor):
        self.dtype = value.dtype  # the parameter's dtype; W is rounded to it at each write
        self.W = value.detach().to("cpu", torch.float64).clone()
        self.W0: torch.Tensor | None = None  # set at the first step or at a restart
        self.V = torch.zeros_like(self.W)
        self.t = 0
        self.A = 0.0
        self.z: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None  # one bool per group: group of z exactly zero
        self.margin: torch.Tensor | None = None  # per group: ||z_G|| - thr (before the prox)
        self.norm: torch.Tensor | None = None  # per group: ||z_G|| (before the prox)
        self.absmax = float(self.W.abs().max()) if self.W.numel() else 0.0  # max |W| so far
        self.c_min = 1.0  # smallest momentum any step used


class Float64RMDA:
    """Mirror of an RMDA optimizer in float64.

    ``groups`` is a list of dicts with keys ``params`` (tensors: only their initial values
    and dtypes are read), ``lr``, ``momentum``, ``lam``, ``grouping``. Tests change
    ``lr``/``momentum`` in ``self.groups`` exactly when they change the optimizer's.
    ``round_w``: emulate the library's single rounding of W to the parameter dtype at each
    write (needed for bf16/fp16 params; a no-op in effect for fp64).
    """

    def __init__(self, groups: list[dict], round_w: bool = False):
        self.groups = []
        for g in groups:
            g = dict(g)
            g["states"] = [ParamState(p) for p in g.pop("params")]
            self.groups.append(g)
        self.round_w = round_w

    @property
    def states(self) -> list[ParamState]:
        return [s for g in self.groups for s in g["states"]]

    # -- the update, one line per method (mutants override exactly one) --------------------

    def beta(self, t: int) -> float:
        return math.sqrt(t)

    def step_size(self, lr: float, beta: float) -> float:
        return lr * beta

    def accumulate_alpha(self, A: float, s: float) -> float:
        return A + s

    def accumulate_dual(self, V: torch.Tensor, s: float, g: torch.Tensor) -> torch.Tensor:
        return V + s * g

    def dual_point(self, W0: torch.Tensor, V: torch.Tensor, beta: float) -> torch.Tensor:
        return W0 - V / beta

    def threshold(self, lam: float, A: float, beta: float) -> float:
        return lam * A / beta

    def group_threshold(self, tau: float, group_size: int) -> float:
        return tau * math.sqrt(group_size)

    def prox_grouping(self, grouping: str) -> str:
        return grouping

    def mix(self, W: torch.Tensor, z: torch.Tensor, c: float) -> torch.Tensor:
        return (1 - c) * W + c * z

    def skip_step(self, st: ParamState) -> None:
        """What happens to a parameter whose grad is None: nothing."""

    def restart_state(self, st: ParamState) -> None:
        st.W0 = st.W.clone()
        st.V = torch.zeros_like(st.W)
        st.t = 0
        st.A = 0.0

    # -- the proximal operator ---------------------------------------------------------------

    def prox(self, z: torch.Tensor, tau: float, grouping: str):
        """Returns (prox(z), zero mask per group, margin n - thr per group, norm per group)."""
        grouping = self.prox_grouping(grouping)
        z = z.clone()
        if grouping == "elementwise":  # L1, no size weight
            thr = self.group_threshold(tau, 1)
            n = z.abs().flatten()
            out = torch.sign(z) * torch.clamp(z.abs() - thr, min=0.0)
            return out, (n <= thr), n - thr, n
        slices = group_slices(tuple(z.shape), grouping)
        zero, margin, norms = [], [], []
        for idx in slices:
            zg = z[idx]
            n = float(torch.linalg.vector_norm(zg)) if zg.numel() else 0.0
            thr = self.group_threshold(tau, zg.numel())
            if n > thr:
                z[idx] = zg * ((n - thr) / n)
            else:  # includes n == 0: the group is 0, never NaN
                z[idx] = 0.0
            zero.append(n <= thr)
            margin.append(n - thr)
            norms.append(n)
        return (z, torch.tensor(zero, dtype=torch.bool),
                torch.tensor(margin, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64))

    # -- driver ------------------------------------------------------------------------------

    def _round(self, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return W.to(dtype).to(torch.float64) if self.round_w else W

    def coupled_prox(self, zs: list[torch.Tensor], ids: list[list[int]], taus: list[float]):
        """The prox of coupled groups (shared/SPEC.md): the columns ``zs[k][:, j]`` with the
        same id ``ids[k][j]`` form one group, across tensors. Returns (prox points, and per
        tensor and column: its group zero?, its group's norm - threshold, its group's norm)."""
        members: dict[int, list[tuple[int, int]]] = {}
        for k, col_ids in enumerate(ids):
            for j, g in enumerate(col_ids):
                members.setdefault(g, []).append((k, j))
        out = [z.clone() for z in zs]
        zero = [torch.zeros(len(col_ids), dtype=torch.bool) for col_ids in ids]
        margin = [torch.zeros(len(col_ids), dtype=torch.float64) for col_ids in ids]
        norm = [torch.zeros(len(col_ids), dtype=torch.float64) for col_ids in ids]
        for cols in members.values():
            n = math.sqrt(sum(float((zs[k][:, j] ** 2).sum()) for k, j in cols))
            size = sum(zs[k][:, j].numel() for k, j in cols)
            thr = self.group_threshold(taus[cols[0][0]], size)
            for k, j in cols:
                out[k][:, j] = zs[k][:, j] * ((n - thr) / n) if n > thr else 0.0
                zero[k][j] = n <= thr  # a NaN norm is never zero
                margin[k][j], norm[k][j] = n - thr, n
        return out, zero, margin, norm

    def dual_step(self, st: ParamState, g: torch.Tensor, lr: float) -> tuple[torch.Tensor, float]:
        """t, A and V of one parameter; returns (z before the prox, beta)."""
        g = g.detach().to("cpu", torch.float64)
        if st.W0 is None:
            st.W0 = st.W.clone()
        st.t += 1
        beta = self.beta(st.t)
        s = self.step_size(lr, beta)
        st.A = self.accumulate_alpha(st.A, s)
        st.V = self.accumulate_dual(st.V, s, g)
        return self.dual_point(st.W0, st.V, beta), beta

    def finish_step(self, st: ParamState, z: torch.Tensor, c: float) -> None:
        st.z = z
        st.W = self._round(self.mix(st.W, z, c), st.dtype)
        st.c_min = min(st.c_min, c)
        if st.W.numel():
            st.absmax = max(st.absmax, float(st.W.abs().max()))

    def param_step(self, st: ParamState, g: torch.Tensor, lr: float, c: float, lam: float,
                   grouping: str) -> None:
        z, beta = self.dual_step(st, g, lr)
        channel_less = grouping in ("input_channel", "output_channel") and g.dim() < 2
        if grouping != "none" and not channel_less:  # no regularization there, lam ignored
            tau = self.threshold(lam, st.A, beta)
            z, st.zero, st.margin, st.norm = self.prox(z, tau, grouping)
        self.finish_step(st, z, c)

    def coupled_group_step(self, group: dict, grads: list) -> None:
        """A "coupled" param group: every member's dual step, then the prox over groups
        that span tensors (``group["channel_groups"]``: per parameter its column ids)."""
        lr, c, lam = float(group["lr"]), float(group["momentum"]), float(group["lam"])
        members = []
        for st, g, ids in zip(group["states"], grads, group["channel_groups"]):
            if g is None:
                self.skip_step(st)
                continue
            z, beta = self.dual_step(st, g, lr)
            if g.dim() < 2:
                self.finish_step(st, z, c)
            else:
                members.append((st, z, [int(x) for x in ids], self.threshold(lam, st.A, beta)))
        results = self.coupled_prox([m[1] for m in members], [m[2] for m in members],
                                    [m[3] for m in members])
        for (st, *_), z, zero, margin, norm in zip(members, *results):
            st.zero, st.margin, st.norm = zero, margin, norm
            self.finish_step(st, z, c)

    def step(self, grads: list[torch.Tensor | None]) -> None:
        """One optimizer step; ``grads`` is aligned with :attr:`states` (None: no gradient)."""
        states = self.states
        assert len(grads) == len(states)
        it = iter(grads)
        for group in self.groups:
            mine = [next(it) for _ in group["states"]]
            if group["grouping"] == "coupled":
                self.coupled_group_step(group, mine)
                continue
            for st, g in zip(group["states"], mine):
                if g is None:
                    self.skip_step(st)
                    continue
                self.param_step(st, g, float(group["lr"]), float(group["momentum"]),
                                float(group["lam"]), group["grouping"])

    def restart(self) -> None:
        for st in self.states:
            self.restart_state(st)
