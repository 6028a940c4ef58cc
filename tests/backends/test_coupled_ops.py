"""The C++ kernels of a coupled-group step's two kernel phases (rmda_fused::rmda_partials_,
rmda_fused::rmda_apply_; cpu, and cuda where a GPU is) against a float64 statement of the
phases written here, and torch.library.opcheck on both ops.

Each step checks each phase on its own: the float64 statement starts from the kernel's state
as it stands (so rounding does not compound over the steps), and the scales handed to
rmda_apply_ are the float64 group-lasso scales of the step's partials."""
from __future__ import annotations

import math

import pytest
import torch

from rmda_fused.backends import cpu, cuda
from rmda_fused.batch import StepBatch, StepOptions, state_dtype
from rmda_fused.grouping import memory_group_view

if cpu.unavailable_reason():
    pytest.skip(f"C++ backend unavailable: {cpu.unavailable_reason()}", allow_module_level=True)
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(
        cuda.unavailable_reason() is not None,
        reason=f"cuda backend: {cuda.unavailable_reason()}")),
]
BACKENDS = {"cpu": cpu, "cuda": cuda}

# (shape, channels_last): 3x3 and 1x1 convs, a linear layer, odd sizes, an empty tensor, a
# channels_last conv (its memory view has inner == 1), a contiguous-groups view (outer == 1)
SPECS = [((8, 5, 3, 3), False), ((16, 7, 1, 1), False), ((9, 13), False), ((7, 3, 5), False),
         ((3, 11, 2, 3), False), ((0, 4), False), ((1, 6, 5), False), ((8, 5, 3, 3), True),
         ((6, 3, 5, 5), True)]
TOLERANCE = {  # (rtol, atol) of V and the partials / of W
    torch.float64: ((1e-12, 1e-12), (1e-12, 1e-12)),
    torch.float32: ((2e-5, 1e-6), (2e-5, 1e-6)),
    torch.bfloat16: ((2e-5, 1e-6), (8e-3, 1e-3)),
    torch.float16: ((2e-5, 1e-6), (1e-3, 1e-4)),
}
LR, MOMENTUM, LAM = 0.1, 0.3, 0.2


def _layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _make(specs, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    acc = state_dtype(dtype)
    state = {k: [] for k in ("params", "initials", "duals", "steps", "alphas")}
    for i, (shape, channels_last) in enumerate(specs):
        fmt = _layout(channels_last)
        w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        state["initials"].append(w0.to(dtype).contiguous(memory_format=fmt).to(device))
        state["params"].append((w0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64))
                               .to(dtype).contiguous(memory_format=fmt).to(device))
        state["duals"].append((0.1 * torch.randn(shape, generator=gen, dtype=torch.float64))
                              .to(acc).contiguous(memory_format=fmt).to(device))
        state["steps"].append(torch.tensor(float(i % 3), dtype=acc, device=device))
        state["alphas"].append(torch.tensor(0.05 * (i % 3), dtype=acc, device=device))
    return state


def _grads(state, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for p in state["params"]:
        g = torch.empty_like(p)  # in p's memory layout
        g.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        grads.append(g)
    return grads


def _batch(state, grads):
    n = len(state["params"])
    views = [memory_group_view(p, "input_channel") for p in state["params"]]
    return StepBatch(state["params"], grads, state["initials"], state["duals"], state["steps"],
                     state["alphas"], [None] * n, views)


def _per_group(state):
    return [torch.zeros(p.shape[1], dtype=state_dtype(p.dtype), device=p.device)
            for p in state["params"]]


def _clone(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


# --- the float64 statement of the two phases (contract: rmda_partials_ / rmda_apply_) ---

def expected_partials(w0, v, g, t, a, lr, grad_scale):
    """(t, A, V, partials) after phase 1, in float64."""
    t = t + 1.0
    beta = math.sqrt(t)
    s = lr * beta
    a = a + s
    v = v + (s / (1.0 if grad_scale is None else grad_scale)) * g
    z = w0 - v / beta
    partials = torch.zeros(w0.shape[1], dtype=torch.float64)
    for k in range(w0.shape[1]):
        column = z[:, k]
        partials[k] = (column * column).sum()
    return t, a, v, partials


def expected_scales(partials, t, a, shape, lam):
    """The group-lasso scale of each input channel alone (singleton coupled groups)."""
    beta = math.sqrt(t)
    size = shape[0] * math.prod(shape[2:])
    thr = lam * a / beta * math.sqrt(size)
    scales = torch.zeros_like(partials)
    for k in range(len(partials)):
        n = math.sqrt(partials[k])
        scales[k] = max(0.0, n - thr) / n if n > 0 else 0.0
    return scales


def expected_weight(w, w0, v, t, scales, c):
    beta = math.sqrt(t)
    z = w0 - v / beta
    out = w.clone()
    for k in range(w.shape[1]):
        out[:, k] = (1 - c) * w[:, k] + c * (scales[k] * z[:, k])
    return out


def _f64(x):
    return x.detach().to("cpu", torch.float64)


def _run_step(backend, state, grads, dtype, lr=LR, grad_scale=None, check=True):
    """One partials -> (float64 scales) -> apply step of the kernels, each phase checked
    against the float64 statement from the state it started from."""
    before = _clone(state)
    batch = _batch(state, grads)
    options = StepOptions(lr=lr, momentum=MOMENTUM, lam=LAM, grouping="coupled",
                          grad_scale=grad_scale)
    partials = _per_group(state)
    backend.rmda_partials_(batch, options, partials)
    scale_value = None if grad_scale is None else float(grad_scale)
    (v_tol, w_tol) = TOLERANCE[dtype]
    scales = []
    for i, p in enumerate(state["params"]):
        t, a, v, want = expected_partials(
            _f64(before["initials"][i]), _f64(before["duals"][i]), _f64(grads[i]),
            float(before["steps"][i]), float(before["alphas"][i]), float(lr), scale_value)
        if check:
            assert float(state["steps"][i]) == t
            torch.testing.assert_close(_f64(state["alphas"][i]),
                                       torch.tensor(a, dtype=torch.float64),
                                       rtol=v_tol[0], atol=v_tol[1])
            torch.testing.assert_close(_f64(state["duals"][i]), v, rtol=v_tol[0], atol=v_tol[1])
            torch.testing.assert_close(_f64(partials[i]), want, rtol=v_tol[0], atol=v_tol[1])
        scales.append(expected_scales(want, t, a, p.shape, LAM).to(partials[i]))
    weights = [p.clone() for p in state["params"]]
    after_partials = _clone(state)
    backend.rmda_apply_(batch, options, scales)
    for key in ("initials", "duals", "steps", "alphas"):  # apply writes W only
        assert all(torch.equal(x, y) for x, y in zip(state[key], after_partials[key])), key
    for i, p in enumerate(state["params"]):
        want = expected_weight(_f64(weights[i]), _f64(state["initials"][i]),
                               _f64(state["duals"][i]), float(state["steps"][i]), _f64(scales[i]),
                               MOMENTUM)
        if check:
            torch.testing.assert_close(_f64(p), want, rtol=w_tol[0], atol=w_tol[1])
    return partials, scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_phases_match_float64(dtype, device):
    state = _make(SPECS, dtype, seed=1, device=device)
    cut = []
    for k in range(3):
        _, scales = _run_step(BACKENDS[device], state, _grads(state, seed=10 + k), dtype)
        cut.append(torch.cat([s.cpu() for s in scales]))
    # the threshold zeroes some groups and keeps others: both branches of apply are checked
    assert bool((cut[-1] == 0).any()) and bool((cut[-1] > 0).any())
    assert all(p.is_contiguous(memory_format=_layout(cl))
               for p, (_, cl) in zip(state["params"], SPECS))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_lr_tensor_in_one_call(device):
    specs = [((8, 5, 3, 3), False), ((9, 13), False), ((16, 7, 1, 1), False)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    state = {k: [] for k in ("params", "initials", "duals", "steps", "alphas")}
    for spec, dtype in zip(specs, dtypes):
        one = _make([spec], dtype, seed=2, device=device)
        for key in state:
            state[key] += one[key]
    lr = torch.tensor(0.2, device=device)
    for k in range(2):
        grads = _grads(state, seed=20 + k)
        # bf16 sets the loosest tolerance for the whole call
        _run_step(BACKENDS[device], state, grads, torch.bfloat16, lr=lr)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_found_inf(device):
    state = _make(SPECS[:4], torch.float32, seed=3, device=device)
    backend = BACKENDS[device]
    grad_scale = torch.tensor(1024.0, device=device)
    grads = _grads(state, seed=4, scale=1024.0)
    _run_step(backend, state, grads, torch.float32, grad_scale=grad_scale)

    before = _clone(state)
    batch = _batch(state, grads)
    options = StepOptions(lr=LR, momentum=MOMENTUM, lam=LAM, grouping="coupled",
                          grad_scale=grad_scale, found_inf=torch.tensor(1.0, device=device))
    backend.rmda_partials_(batch, options, _per_group(state))
    backend.rmda_apply_(batch, options, [torch.ones_like(s) for s in _per_group(state)])
    for key in before:
        for got, want in zip(state[key], before[key]):
            assert torch.equal(got, want), key  # not even t moves


def test_split_rows_are_deterministic_across_thread_counts():
    # tensors over the row-chunk size (128K entries) are split across threads with per-chunk
    # column sums summed in chunk order: the same bits on 1 and on 2 threads
    specs = [((512, 64, 3, 3), False), ((300, 1000), False), ((128, 40, 7, 7), True),
             ((8, 5, 3, 3), False)]
    two = _make(specs, torch.float32, seed=5)
    one = _clone(two)
    threads = torch.get_num_threads()
    try:
        for k in range(2):
            grads = _grads(two, seed=30 + k)
            torch.set_num_threads(2)
            partials_two, _ = _run_step(cpu, two, grads, torch.float32)
            torch.set_num_threads(1)
            partials_one, _ = _run_step(cpu, one, grads, torch.float32, check=False)
            for a, b in zip(partials_two, partials_one):
                assert torch.equal(a, b)
            for key in two:
                for a, b in zip(two[key], one[key]):
                    assert torch.equal(a, b), key
    finally:
        torch.set_num_threads(threads)


def _op_args(dtype=torch.float32):
    state = _make(SPECS[:3] + SPECS[-2:-1], dtype, seed=6)
    grads = _grads(state, seed=7)
    views = [n for p in state["params"] for n in memory_group_view(p, "input_channel")]
    partials_args = (state["params"], grads, state["initials"], state["duals"], state["steps"],
                     state["alphas"], _per_group(state), views, 0.1)
    apply_args = (state["params"], state["initials"], state["duals"], state["steps"],
                  [torch.rand(p.shape[1]) for p in state["params"]], views, 0.3)
    return partials_args, apply_args


@pytest.mark.parametrize("amp", [False, True])
def test_opcheck(amp):
    partials_args, apply_args = _op_args()
    partials_kwargs, apply_kwargs = {}, {}
    if amp:
        partials_kwargs = dict(lr_tensor=torch.tensor(0.1), grad_scale=torch.tensor(2.0),
                               found_inf=torch.tensor(0.0))
        apply_kwargs = dict(found_inf=torch.tensor(0.0))
    torch.library.opcheck(torch.ops.rmda_fused.rmda_partials_.default, partials_args,
                          partials_kwargs)
    torch.library.opcheck(torch.ops.rmda_fused.rmda_apply_.default, apply_args, apply_kwargs)


def test_argument_errors_name_the_parameter():
    partials_args, apply_args = _op_args()
    ops = torch.ops.rmda_fused

    def partials_with(index, value):
        args = list(partials_args)
        args[index] = value
        return args

    def apply_with(index, value):
        args = list(apply_args)
        args[index] = value
        return args

    wrong_dtype = [t.double() if i == 1 else t for i, t in enumerate(partials_args[6])]
    with pytest.raises(RuntimeError, match=r"rmda_partials_: partials of parameter 1 must be"):
        ops.rmda_partials_(*partials_with(6, wrong_dtype))
    views = list(partials_args[7])
    views[3:6] = [1, 2, 3]
    with pytest.raises(RuntimeError, match=r"rmda_partials_: view \(1, 2, 3\) does not cover "
                                           r"parameter 1"):
        ops.rmda_partials_(*partials_with(7, views))
    grads = [t.double() if i == 2 else t for i, t in enumerate(partials_args[1])]
    with pytest.raises(RuntimeError, match=r"grad and initial of parameter 2 must have"):
        ops.rmda_partials_(*partials_with(1, grads))
    with pytest.raises(RuntimeError, match=r"one entry and views 3 ints per parameter"):
        ops.rmda_partials_(*partials_with(6, partials_args[6][:-1]))
    short = [t[:-1] if i == 3 else t for i, t in enumerate(apply_args[4])]
    with pytest.raises(RuntimeError, match=r"rmda_apply_: scales of parameter 3 must be"):
        ops.rmda_apply_(*apply_with(4, short))
    strided = [t.t() if i == 2 else t for i, t in enumerate(apply_args[2])]
    with pytest.raises(RuntimeError, match=r"rmda_apply_: tensors of parameter 2 must share"):
        ops.rmda_apply_(*apply_with(2, strided))
