"""RMDA against the independent float64 reference (tests/float64_reference.py), per backend.

The scenario (tests/helpers.py) is a small model-like set of parameters: conv (O,I,3,3) and
(O,I,1,1), linear, empty tensors, an all-zero start, a group with ||z_G|| == 0 exactly, one
param group per grouping (input_channel, output_channel, elementwise, none with lam set and
ignored); seeded gradients with per-group directions so that the prox zeroes some groups and
not others; 200 steps with a restart at 100, lr halved at 60, momentum doubled at 150, and
parameters whose grad is None on some steps.

The second half proves the comparison DISCRIMINATES: each mutant of the reference (one
deliberate change to one line of the update) must NOT match the library.
"""
from __future__ import annotations

import math

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA
from helpers import Schedule, compare, mask_mismatches, mask_stats, run_reference_only, run_scenario

# Scenario lengths. The main fp32 run is the long one; the others are shorter because a Triton
# backend runs in its (slow, ~0.2 s/step) interpreter on machines without a GPU.
MAIN_STEPS = 200
SHORT_STEPS = 60


def require_dtype(backend: str, device: str, dtype: torch.dtype) -> None:
    """Skip (with the backend's own message) if ``backend`` rejects ``dtype`` parameters."""
    p = torch.nn.Parameter(torch.zeros(6, 4, 3, 3, dtype=dtype, device=device))
    p.grad = torch.ones_like(p)
    opt = rmda_fused.RMDA([p], lr=0.1, lam=0.1, backend=backend)
    try:
        opt.step()
    except (TypeError, NotImplementedError, RuntimeError, ValueError) as exc:
        if str(dtype).split(".")[-1] in str(exc) or "dtype" in str(exc):
            pytest.skip(f"backend {backend!r} does not support {dtype} on {device}: {exc}")
        raise


def _checked_run(backend, device, dtype, steps, **kwargs):
    """run_scenario, comparing with the reference at the schedule's checkpoints."""
    failures = []
    checkpoints = Schedule(steps).checkpoints()

    def on_step(k, opt, params, ref):
        if k in checkpoints:
            failures.extend(f"after step {k}: {f}" for f in compare(opt, params, ref))

    opt, params, ref = run_scenario(backend, device, dtype, steps=steps, on_step=on_step, **kwargs)
    return opt, params, ref, failures


@pytest.mark.parametrize("dtype, steps", [(torch.float32, MAIN_STEPS), (torch.float64, SHORT_STEPS)],
                         ids=["fp32", "fp64"])
def test_matches_float64_reference(backend, device, dtype, steps):
    opt, params, ref, failures = _checked_run(backend, device, dtype, steps)
    assert not failures, "\n".join(failures)

    # the scenario is not vacuous: the prox zeroed some groups of z and kept others
    zero, nonzero = mask_stats(ref)
    assert zero >= 10 and nonzero >= 10, (zero, nonzero)
    for p in params:
        assert torch.isfinite(p).all()
        for key in ("dual", "initial"):
            assert torch.isfinite(opt.state[p][key]).all()
    conv_a, _, _, empty_conv, conv_b, fc_zero, empty_fc, conv_l1, empty_l1, bias_a, bias_b = params
    # input channel 1 of conv_a starts at 0 and gets 0 gradient: ||z_G|| == 0 -> zero, no NaN
    assert bool(opt.state[conv_a]["zero_mask"][1])
    assert torch.equal(conv_a.detach()[:, 1].cpu(), torch.zeros_like(conv_a.detach()[:, 1].cpu()))
    # a zero start with pure-noise gradients: every group of z ends exactly zero
    assert bool(opt.state[fc_zero]["zero_mask"].all())
    # empty tensors: groups of size 0 are zero groups; no groups at all is an empty mask
    assert opt.state[empty_conv]["zero_mask"].tolist() == [True] * 3
    assert opt.state[empty_fc]["zero_mask"].tolist() == [True] * 4
    assert opt.state[empty_l1]["zero_mask"].numel() == 0
    # grouping 'none' keeps no mask
    assert "zero_mask" not in opt.state[bias_a]
    # the mask has one entry per group, as the grouping defines it
    assert opt.state[conv_b]["zero_mask"].shape == (7,)
    assert opt.state[conv_l1]["zero_mask"].shape == (6 * 4 * 3 * 3,)
    # params skipped every third step took fewer steps since the restart
    restart = Schedule(steps).restart
    assert float(opt.state[bias_a]["step"]) == steps - restart
    expected = sum(1 for k in range(restart + 1, steps + 1) if k % 3)
    assert float(opt.state[bias_b]["step"]) == ref.states[-1].t == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params(backend, device, dtype):
    """bf16/fp16 params: V and the arithmetic in fp32, W rounded once per write.

    The reference emulates that single rounding (round_w). What the library and reference
    can still disagree on is a rounding decision when their fp32/fp64 pre-rounded values
    straddle a rounding boundary; helpers.compare bounds the effect by 4u*max|W|/c
    (u = 2^-8 for bf16, 2^-11 for fp16): see the derivation there. V, A, t keep 1e-5.
    """
    require_dtype(backend, device, dtype)
    opt, params, ref, failures = _checked_run(backend, device, dtype, SHORT_STEPS, momentum=0.5)
    assert not failures, "\n".join(failures)
    for p in params:
        assert p.dtype == dtype
        state = opt.state[p]
        assert state["initial"].dtype == dtype
        assert state["dual"].dtype == torch.float32
        assert state["step"].dtype == torch.float32 and state["alpha"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_momentum_one_makes_w_the_prox_point(backend, device, dtype):
    """c = 1: W <- z, so W's zero groups are exactly the zero_mask."""
    opt, params, ref, failures = _checked_run(backend, device, dtype, 30, momentum=1.0)
    assert not failures, "\n".join(failures)
    checked = 0
    for group, rgroup in zip(opt.param_groups, ref.groups):
        if group["grouping"] == "none":
            continue
        for p, st in zip(group["params"], rgroup["states"]):
            w = p.detach().cpu()
            if group["grouping"] == "input_channel":
                w_zero = [bool((w[:, i] == 0).all()) for i in range(w.shape[1])]
            elif group["grouping"] == "output_channel":
                w_zero = [bool((w[o] == 0).all()) for o in range(w.shape[0])]
            else:
                w_zero = (w == 0).flatten().tolist()
            assert opt.state[p]["zero_mask"].cpu().tolist() == w_zero
            assert torch.equal(opt.state[p]["zero_mask"].cpu(), st.zero) or \
                mask_mismatches(opt.state[p]["zero_mask"], st, 1e-4)[0] == 0
            checked += sum(w_zero)
    assert checked >= 10  # W really has exact zero groups


def test_lr_as_tensor(backend, device):
    """A 0-d tensor lr (as schedulers with capturable optimizers use) means the same lr."""
    opt, params, ref, failures = _checked_run(backend, device, torch.float32, 16, lr_tensor=True)
    assert not failures, "\n".join(failures)


def test_param_without_grad_is_untouched(backend, device):
    a = torch.nn.Parameter(torch.randn(6, 4, 3, 3, device=device))
    b = torch.nn.Parameter(torch.randn(6, 4, 3, 3, device=device))
    before = b.detach().clone()
    opt = rmda_fused.RMDA([a, b], lr=0.1, lam=0.01, backend=backend)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        opt.step()
    assert torch.equal(b.detach(), before)
    assert b not in opt.state or float(opt.state[b]["step"]) == 0
    assert float(opt.state[a]["step"]) == 3
    opt.zero_grad()
    opt.step()  # no gradients at all: nothing happens
    assert float(opt.state[a]["step"]) == 3


def test_auto_backend_resolves_to_a_usable_backend():
    name = rmda_fused.functional.resolve_backend("auto", torch.device("cpu"))
    assert rmda_fused.available_backends()[name] is None
    opt, params, ref = run_scenario("auto", steps=20)
    assert not compare(opt, params, ref)


def test_restart_semantics_directly():
    """restart(): W0 <- W, V <- 0, t <- 0, A <- 0, and W itself is unchanged."""
    p = torch.nn.Parameter(torch.randn(5, 3, 1, 1, dtype=torch.float64))
    opt = rmda_fused.RMDA([p], lr=0.1, momentum=0.3, lam=0.05)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
    w = p.detach().clone()
    opt.restart()
    state = opt.state[p]
    assert torch.equal(p.detach(), w)
    assert torch.equal(state["initial"], w)
    assert not state["dual"].any() and float(state["step"]) == 0 and float(state["alpha"]) == 0
    # the next step is a first step from W0 = W: z = prox(W - lr*g, lam*lr)
    g = torch.randn_like(p)
    p.grad = g
    opt.step()
    z = w - 0.1 * g
    norms = z.pow(2).sum(dim=(0, 2, 3), keepdim=True).sqrt()
    thr = 0.05 * 0.1 * math.sqrt(5)
    z = z * torch.clamp(norms - thr, min=0) / norms
    torch.testing.assert_close(p.detach(), 0.7 * w + 0.3 * z, rtol=1e-12, atol=1e-14)


# -- the comparison discriminates: mutants of the reference must NOT match ---------------------

class BetaIsT(Float64RMDA):
    def beta(self, t):
        return float(t)


class StepSizeIsLr(Float64RMDA):
    def step_size(self, lr, beta):
        return lr


class AlphaNotAccumulated(Float64RMDA):
    def accumulate_alpha(self, A, s):
        return s


class DualWithoutStepSize(Float64RMDA):
    def accumulate_dual(self, V, s, g):
        return V + g


class DualPointWithoutBeta(Float64RMDA):
    def dual_point(self, W0, V, beta):
        return W0 - V


class TauWithoutBeta(Float64RMDA):
    def threshold(self, lam, A, beta):
        return lam * A


class NoGroupSizeWeight(Float64RMDA):
    def group_threshold(self, tau, group_size):
        return tau


class GroupSizeNotSquareRooted(Float64RMDA):
    def group_threshold(self, tau, group_size):
        return tau * group_size


class SwappedChannelGroups(Float64RMDA):
    def prox_grouping(self, grouping):
        return {"input_channel": "output_channel", "output_channel": "input_channel"}.get(grouping, grouping)


class MomentumSwapped(Float64RMDA):
    def mix(self, W, z, c):
        return c * W + (1 - c) * z


class MomentumIgnored(Float64RMDA):
    def mix(self, W, z, c):
        return z


class RestartKeepsAlpha(Float64RMDA):
    def restart_state(self, st):
        A = st.A
        super().restart_state(st)
        st.A = A


class RestartKeepsDual(Float64RMDA):
    def restart_state(self, st):
        V = st.V
        super().restart_state(st)
        st.V = V


class RestartKeepsStep(Float64RMDA):
    def restart_state(self, st):
        t = st.t
        super().restart_state(st)
        st.t = t


class RestartKeepsInitial(Float64RMDA):
    def restart_state(self, st):
        W0 = st.W0
        super().restart_state(st)
        st.W0 = W0 if W0 is not None else st.W.clone()


class SkippedParamAdvancesStep(Float64RMDA):
    def skip_step(self, st):
        st.t += 1


class DualPointFromIterate(Float64RMDA):
    def param_step(self, st, g, lr, c, lam, grouping):
        if st.W0 is not None:
            st.W0 = st.W.clone()  # z = W - V/beta instead of W0 - V/beta
        super().param_step(st, g, lr, c, lam, grouping)


class LrChangeIgnored(Float64RMDA):
    def step(self, grads):
        for g in self.groups:
            g.setdefault("lr0", g["lr"])
            g["lr"] = g["lr0"]
        super().step(grads)


MUTANTS = [BetaIsT, StepSizeIsLr, AlphaNotAccumulated, DualWithoutStepSize, DualPointWithoutBeta,
           TauWithoutBeta, NoGroupSizeWeight, GroupSizeNotSquareRooted, SwappedChannelGroups,
           MomentumSwapped, MomentumIgnored, RestartKeepsAlpha, RestartKeepsDual,
           RestartKeepsStep, RestartKeepsInitial, SkippedParamAdvancesStep, DualPointFromIterate,
           LrChangeIgnored]


@pytest.fixture(scope="module")
def library_runs():
    return {}


def _library_run(cache, backend, dtype):
    if (backend, dtype) not in cache:
        cache[backend, dtype] = run_scenario(backend, "cpu", dtype)
    return cache[backend, dtype]


@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_unmutated_reference_matches(fast_backend, library_runs, dtype):
    """The control: the same harness with the true reference finds no difference."""
    opt, params, ref = _library_run(library_runs, fast_backend, dtype)
    assert not compare(opt, params, ref)
    fresh = run_reference_only(Float64RMDA, dtype)
    opt_only = compare(opt, params, fresh)
    assert not opt_only, opt_only


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.__name__ for m in MUTANTS])
def test_mutant_is_caught(fast_backend, library_runs, mutant):
    opt, params, _ = _library_run(library_runs, fast_backend, torch.float32)
    ref = run_reference_only(mutant, torch.float32)
    failures = compare(opt, params, ref)
    # the W comparison alone catches it (state and masks may catch it too)
    assert any("W rel err" in f for f in failures), (
        f"{mutant.__name__} matches the library's W within tolerance: the test is blind to it; "
        f"other differences: {failures}")
