"""The model-like scenario the backend suite runs, and the comparison against float64.

Shapes are deliberately SMALL and few (a Triton backend runs in its interpreter on machines
without a GPU, and compiles once per distinct shape): conv (6,4,3,3), (5,3,1,1), (7,5,3,3),
linear (10,12), biases (6,), (10,), empty (0,3,3,3) and (4,0).
"""
from __future__ import annotations

import torch

from float64_reference import Float64RMDA

# (name, shape, how the parameter starts, special gradient rule)
#   init "randn": N(0, 0.25); "zeros": all zero; "chan1_zero": randn with input channel 1 zero
#   grad "dense": every step; "every3": None on steps k % 3 == 0; "late": None for k <= 10;
#        "late_noise": as "late", and pure noise (no direction): with a zero start every group
#        of z ends exactly zero; "chan1_zero": input channel 1 of the gradient is always zero
#        (with a zero start there, ||z_G|| == 0 exactly: the prox must give 0, not NaN)
SCENARIO = [
    dict(grouping="input_channel", lr=0.05, momentum=0.1, lam=0.5, params=[
        ("conv_a", (6, 4, 3, 3), "chan1_zero", "chan1_zero"),
        ("pointwise", (5, 3, 1, 1), "randn", "every3"),
        ("fc", (10, 12), "randn", "dense"),
        ("empty_conv", (0, 3, 3, 3), "randn", "dense"),
    ]),
    dict(grouping="output_channel", lr=0.03, momentum=0.3, lam=0.4, params=[
        ("conv_b", (7, 5, 3, 3), "randn", "dense"),
        ("fc_zero", (10, 12), "zeros", "late_noise"),
        ("empty_fc", (4, 0), "randn", "dense"),
    ]),
    dict(grouping="elementwise", lr=0.04, momentum=0.2, lam=0.3, params=[
        ("conv_l1", (6, 4, 3, 3), "randn", "dense"),
        ("empty_l1", (4, 0), "randn", "dense"),
    ]),
    # lam is set but grouping "none" ignores it (docs/algorithm.md); the reference ignores it too
    dict(grouping="none", lr=0.05, momentum=0.5, lam=0.05, params=[
        ("bias_a", (6,), "randn", "dense"),
        ("bias_b", (10,), "randn", "every3"),
    ]),
]

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
# max|diff| / max|ref| allowed for W, V, A (fp32: float32 arithmetic over ~100 steps
# between restarts accumulates a few ulp of 6e-8; fp64: the same in double)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _initial(shape, init, gen):
    w = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if init == "zeros":
        w.zero_()
    elif init == "chan1_zero":
        w[:, 1] = 0.0
    return w


def make_groups(dtype=torch.float32, device="cpu", seed=0, momentum=None, scenario=SCENARIO):
    """Param groups (dicts) of fresh leaf parameters; also returns their names, flat."""
    gen = torch.Generator().manual_seed(seed)
    groups, names = [], []
    for spec in scenario:
        g = {k: v for k, v in spec.items() if k != "params"}
        if momentum is not None:
            g["momentum"] = momentum
        g["params"] = []
        for name, shape, init, _ in spec["params"]:
            w = _initial(shape, init, gen).to(device=device, dtype=dtype)
            g["params"].append(torch.nn.Parameter(w))
            names.append(name)
        groups.append(g)
    return groups, names


class GradStream:
    """Seeded gradients for the scenario: a fixed per-group direction plus noise.

    Per group the direction has rms ``lam * u`` with u cycling through 0..2.5, so that with
    the scenario's lam some groups of z end exactly zero and others clearly not.
    """

    def __init__(self, groups, seed=1, noise=0.5, scenario=SCENARIO):
        self.gen = torch.Generator().manual_seed(seed)
        self.rules, self.bias, self.shapes = [], [], []
        self.noise = noise
        levels = torch.tensor([0.0, 0.3, 2.5, 0.6, 1.6, 0.0, 2.0], dtype=torch.float64)
        for spec, group in zip(scenario, groups):
            lam = max(spec["lam"], 0.2)
            for (name, shape, _, rule), p in zip(spec["params"], group["params"]):
                sign = torch.randint(0, 2, shape, generator=self.gen).to(torch.float64) * 2 - 1
                d = torch.zeros(shape, dtype=torch.float64)
                if rule == "late_noise":
                    pass
                elif len(shape) >= 2 and spec["grouping"] == "input_channel":
                    for i in range(shape[1]):
                        d[:, i] = lam * levels[i % len(levels)]
                elif len(shape) >= 2 and spec["grouping"] == "output_channel":
                    for o in range(shape[0]):
                        d[o] = lam * levels[(o + 2) % len(levels)]
                elif d.numel():
                    d = lam * 2.5 * torch.rand(shape, generator=self.gen, dtype=torch.float64)
                self.bias.append(d * sign)
                self.rules.append(rule)
                self.shapes.append(shape)
        self.params = [p for g in groups for p in g["params"]]

    def next(self, k: int):
        """Gradients of step k (1-based), in each parameter's dtype/device, or None."""
        out = []
        for p, d, rule, shape in zip(self.params, self.bias, self.rules, self.shapes):
            noise = self.noise * torch.randn(shape, generator=self.gen, dtype=torch.float64)
            if (rule == "every3" and k % 3 == 0) or (rule.startswith("late") and k <= 10):
                out.append(None)
                continue
            g = d + noise
            if rule == "chan1_zero":
                g[:, 1] = 0.0
            out.append(g.to(device=p.device, dtype=p.dtype))
        return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


class Schedule:
    """When the scenario restarts and changes hyperparameters, scaled to its length."""

    def __init__(self, steps: int):
        self.steps = steps
        self.lr_change = max(1, round(0.3 * steps))  # lr halved, no restart
        self.restart = max(1, round(0.5 * steps))  # restart (W0 <- W, V, t, A <- 0)
        self.momentum_change = max(1, round(0.75 * steps))  # c doubled (as 'iclr' does)

    def checkpoints(self) -> set[int]:
        s = self
        return {1, 2, 3, s.steps // 4, s.restart - 1, s.restart, s.restart + 1,
                s.momentum_change, s.momentum_change + 1, s.steps}

    def events(self, k, opt_groups, ref):
        """Applied identically to the optimizer's groups and the reference's, after step k."""
        if k == self.lr_change:
            for og, rg in zip(opt_groups, ref.groups):
                rg["lr"] = float(og["lr"]) * 0.5
                og["lr"] = og["lr"] * 0.5  # a tensor lr stays a tensor
        if k == self.momentum_change:
            for og, rg in zip(opt_groups, ref.groups):
                og["momentum"] = rg["momentum"] = min(og["momentum"] * 2.0, 1.0)
        if k == self.restart:  # the caller restarts the optimizer
            ref.restart()


def run_scenario(backend, device="cpu", dtype=torch.float32, steps=200, momentum=None,
                 ref_cls=Float64RMDA, seed=0, on_step=None, lr_tensor=False):
    """Run RMDA and the float64 reference side by side; returns (opt, params, ref).

    The :class:`Schedule` of ``steps``: lr halved at 30%, restart at 50%, momentum doubled at
    75%. ``on_step(k, opt, params, ref)`` is called after step k and its events.
    ``lr_tensor``: hand the optimizer each group's lr as a 0-d tensor on the device.
    """
    import rmda_fused

    groups, _ = make_groups(dtype, device, seed, momentum)
    ref = ref_cls(groups, round_w=dtype in (torch.bfloat16, torch.float16))
    if lr_tensor:
        for g in groups:
            g["lr"] = torch.tensor(g["lr"], device=device)
    opt = rmda_fused.RMDA(groups, backend=backend)
    stream = GradStream(groups, seed + 1)
    params = stream.params
    schedule = Schedule(steps)
    for k in range(1, steps + 1):
        grads = stream.next(k)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        schedule.events(k, opt.param_groups, ref)
        if k == schedule.restart:
            opt.restart()
        if on_step is not None:
            on_step(k, opt, params, ref)
    return opt, params, ref


def run_reference_only(ref_cls, dtype=torch.float32, steps=200, momentum=None, seed=0):
    """The reference (or a mutant) alone, on exactly the inputs run_scenario feeds."""
    groups, _ = make_groups(dtype, "cpu", seed, momentum)
    ref = ref_cls(groups, round_w=dtype in (torch.bfloat16, torch.float16))
    # events() change the optimizer's groups too: hand them throwaway dicts
    fake = [dict(lr=g["lr"], momentum=g["momentum"]) for g in ref.groups]
    stream = GradStream(groups, seed + 1)
    schedule = Schedule(steps)
    for k in range(1, steps + 1):
        ref.step(stream.next(k))
        schedule.events(k, fake, ref)
    return ref


# -- comparison ---------------------------------------------------------------------------------

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (absolute when expected is all zero)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def _within(actual, expected, rtol: float, atol: float) -> tuple[float, bool]:
    """(rel_err, whether max|diff| <= rtol * max|expected| + atol)."""
    a = actual.detach().to("cpu", torch.float64)
    x = expected.detach().to("cpu", torch.float64)
    assert a.shape == x.shape, (a.shape, x.shape)
    if x.numel() == 0:
        return 0.0, True
    diff = (a - x).abs().max().item()
    scale = x.abs().max().item()
    return (diff / scale if scale > 0 else diff), diff <= rtol * scale + atol


def mask_mismatches(mask: torch.Tensor, st, band: float) -> tuple[int, int]:
    """(clear mismatches, ambiguous groups) between a library mask and the reference's.

    A group is ambiguous when the reference's ||z_G|| is within ``band`` (relative to the
    tensor's largest norm/threshold) of its threshold: rounding may legitimately decide it
    either way. A group with ||z_G|| == 0 exactly is never ambiguous: it must be zero.
    """
    mask = mask.detach().cpu()
    assert mask.dtype == torch.bool and mask.shape == st.zero.shape, (mask.dtype, mask.shape, st.zero.shape)
    if mask.numel() == 0:
        return 0, 0
    thr = st.norm - st.margin
    scale = max(float(st.norm.max()), float(thr.max()), 1e-300)
    ambiguous = (st.margin.abs() <= band * scale) & (st.norm > 0)
    wrong = (mask != st.zero) & ~ambiguous
    return int(wrong.sum()), int(ambiguous.sum())


def compare(opt, params, ref, tol=None, band=None, check_masks=True):
    """Every discrepancy between the optimizer and the reference, as readable strings."""
    failures = []
    ref_groups = ref.groups
    flat = [(og, rg, p, st) for og, rg in zip(opt.param_groups, ref_groups)
            for p, st in zip(og["params"], rg["states"])]
    assert [id(p) for *_, p, _ in flat] == [id(p) for p in params]
    for i, (og, rg, p, st) in enumerate(flat):
        dtype = p.dtype
        t = TOLERANCE[dtype] if tol is None else tol
        name = f"param {i} {tuple(p.shape)} {og['grouping']}"
        rounding = 0.0  # absolute error allowed on top of t * max|expected|
        if dtype in (torch.bfloat16, torch.float16):
            # W is rounded to the param dtype at every write. The library and the reference
            # round values that differ by e_k; rounding adds at most 2u*M (M = max|W| so far)
            # and the difference then decays by (1-c) per step: e <= 2u*M/c. A restart copies
            # W (with its error) into W0, which can add the same bound once more: 4u*M/c
            # (c: the smallest momentum used; u = 2^-8 for bf16, 2^-11 for fp16).
            rounding = 4 * UNIT_ROUNDOFF[dtype] / st.c_min * st.absmax
        e, ok = _within(p, st.W, t, rounding)
        if not ok:
            failures.append(f"{name}: W rel err {e:.3g} > {t:.3g} (+ abs {rounding:.3g})")
        state = opt.state.get(p, {})
        if st.W0 is None:  # never stepped, never restarted
            if state and float(state["step"]) != 0:
                failures.append(f"{name}: has stepped but the reference has not")
            continue
        if float(state["step"]) != st.t:
            failures.append(f"{name}: step {float(state['step'])} != {st.t}")
        e = rel_err(state["dual"], st.V)
        if not e <= t:
            failures.append(f"{name}: dual rel err {e:.3g} > {t:.3g}")
        e = rel_err(state["alpha"], torch.tensor(st.A, dtype=torch.float64))
        if not e <= t:
            failures.append(f"{name}: alpha rel err {e:.3g} > {t:.3g}")
        e, ok = _within(state["initial"], st.W0, t, rounding)
        if not ok:
            failures.append(f"{name}: initial rel err {e:.3g} > {t:.3g} (+ abs {rounding:.3g})")
        if og["grouping"] == "none":
            if "zero_mask" in state:
                failures.append(f"{name}: grouping 'none' has a zero_mask")
        elif check_masks and st.zero is not None:
            # rounding of W0 (low precision) moves z's norms by up to ~ the W bound
            b = band if band is not None else max(1e-4, 10 * (rounding / max(st.absmax, 1e-300) + t))
            mask = state["zero_mask"]
            if mask.dtype != torch.bool or mask.shape != st.zero.shape:
                failures.append(f"{name}: zero_mask is {mask.dtype} {tuple(mask.shape)}, the "
                                f"reference has {tuple(st.zero.shape)} groups")
                continue
            wrong, _ = mask_mismatches(mask, st, b)
            if wrong:
                failures.append(f"{name}: {wrong} zero_mask entries differ from the reference's "
                                f"{st.zero.tolist()} vs {state['zero_mask'].tolist()}")
    return failures


def mask_stats(ref):
    """(zero groups, nonzero groups) over the reference's last masks."""
    zero = sum(int(st.zero.sum()) for st in ref.states if st.zero is not None)
    total = sum(st.zero.numel() for st in ref.states if st.zero is not None)
    return zero, total - zero


# -- refused calls ------------------------------------------------------------------------------

def snapshot(opt, params):
    """Everything a step may write: the parameters and their state tensors, cloned (keyed
    by position; parameters without state are left out)."""
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if opt.state.get(p)})


def assert_unchanged(before, opt, params):
    """The parameters and state are bit-identical to ``snapshot``'s, and no parameter
    gained state."""
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {i for i, p in enumerate(params) if opt.state.get(p)} == set(state)
    for i, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(opt.state[params[i]][key], value), key
