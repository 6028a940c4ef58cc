"""The C++ backends (cpu; cuda where a GPU is) against the reference backend, and
torch.library.opcheck on their op."""
from __future__ import annotations

import itertools

import pytest
import torch

from rmda_fused import _extension, functional
from rmda_fused.backends import cpu, cuda, reference
from rmda_fused.batch import StepBatch, StepOptions
from rmda_fused.grouping import group_view, num_groups

if cpu.unavailable_reason():
    pytest.skip(f"C++ backend unavailable: {cpu.unavailable_reason()}", allow_module_level=True)
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(
        cuda.unavailable_reason() is not None, reason=f"cuda backend: {cuda.unavailable_reason()}")),
]

SHAPES = {
    "input_channel": [(8, 6, 3, 3), (16, 4, 1, 1), (12, 10), (7, 5, 3, 3), (0, 3, 3, 3),
                      (3, 0, 2, 2), (40, 300), (70, 5, 11, 11), (256, 40, 3, 3)],
    "output_channel": [(8, 6, 3, 3), (16, 4, 1, 1), (12, 10), (7, 5, 3, 3), (0, 3, 3, 3),
                       (5, 3000), (1, 70000)],
    "elementwise": [(8, 6, 3, 3), (7, 5, 3, 3), (13,), (0,), (33, 17)],
    "none": [(8, 6, 3, 3), (13,), (1,), (0,), (1000, 33)],
}
TOLERANCE = {  # (rtol, atol) of the parameter after several steps
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(shapes, dtype, grouping, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    lists = {k: [] for k in ("params", "initials", "duals", "steps", "alphas", "zero_masks")}
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        acc = _state_dtype(dtype)
        lists["params"].append(p)
        lists["initials"].append(p.clone())
        lists["duals"].append(torch.randn(shape, generator=gen, dtype=acc) * 0.1)
        lists["steps"].append(torch.tensor(float(i % 3), dtype=acc))
        lists["alphas"].append(torch.tensor(0.05 * (i % 3), dtype=acc))
        lists["zero_masks"].append(
            None if grouping == "none" else torch.zeros(num_groups(shape, grouping), dtype=torch.bool))
    return {k: [None if t is None else t.to(device) for t in v] for k, v in lists.items()}


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
            for p in params]


def _clone(lists):
    return {k: [None if t is None else t.clone() for t in v] for k, v in lists.items()}


def _step(backend, lists, grads, grouping, **kw):
    kw.setdefault("lr", 0.1)
    kw.setdefault("momentum", 0.3)
    kw.setdefault("lam", 0.5)
    kw.setdefault("grad_scale", None)
    kw.setdefault("found_inf", None)
    views = [group_view(p.shape, grouping) for p in lists["params"]]
    batch = StepBatch(lists["params"], grads, lists["initials"], lists["duals"], lists["steps"],
                      lists["alphas"], lists["zero_masks"], views)
    backend.rmda_step_(batch, StepOptions(grouping=grouping, **kw))


def _assert_same(got, want, dtype):
    rtol, atol = TOLERANCE[dtype]
    for key in want:
        for a, b in zip(got[key], want[key]):
            if b is None:
                continue
            if key == "zero_masks":
                assert torch.equal(a, b), key
            else:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=key)


def _backend(device):
    return cpu if device == "cpu" else cuda


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(grouping, dtype, device):
    shapes = SHAPES[grouping]
    ours = _make(shapes, dtype, grouping, seed=1, device=device)
    ref = _clone(ours)
    for k in range(3):
        grads = _grads(ours["params"], seed=10 + k)
        _step(_backend(device), ours, grads, grouping)
        _step(reference, ref, grads, grouping)
        _assert_same(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_big_strided_tensors_split_over_threads(dtype):
    # tensors over the kernel's row-chunk size (128K entries) are split across threads with
    # per-chunk partial norms: same result as the reference, and bitwise the same on 1 thread
    shapes = [(64, 900, 3, 3), (300, 1000), (10, 70000), (8, 6, 3, 3)]
    two = _make(shapes, dtype, "input_channel", seed=1)
    one, ref = _clone(two), _clone(two)
    threads = torch.get_num_threads()
    try:
        for k in range(3):
            g = _grads(two["params"], seed=10 + k)
            torch.set_num_threads(2)
            _step(cpu, two, g, "input_channel", lam=5.0)
            torch.set_num_threads(1)
            _step(cpu, one, g, "input_channel", lam=5.0)
            _step(reference, ref, g, "input_channel", lam=5.0)
            _assert_same(two, ref, dtype)
            for key in two:
                for a, b in zip(two[key], one[key]):
                    assert torch.equal(a, b), key
    finally:
        torch.set_num_threads(threads)
    masks = torch.cat(two["zero_masks"])
    assert masks.any() and not masks.all()  # the threshold cut some groups, not all


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", ["input_channel", "output_channel", "elementwise"])
def test_zero_masks_and_exact_zeros(grouping, device):
    # lam large enough that every group is cut: z and, with c = 1, W must be exactly 0
    shapes = [(8, 6, 3, 3), (12, 10)]
    ours = _make(shapes, torch.float64, grouping, seed=2, device=device)
    ref = _clone(ours)
    grads = _grads(ours["params"], seed=3)
    _step(_backend(device), ours, grads, grouping, lam=1e6, momentum=1.0)
    _step(reference, ref, grads, grouping, lam=1e6, momentum=1.0)
    _assert_same(ours, ref, torch.float64)
    assert all(bool(m.all()) for m in ours["zero_masks"])
    assert all(bool((p == 0).all()) for p in ours["params"])


def test_zero_norm_groups_give_zero_not_nan():
    # z == 0 in some groups with lam == 0: the norm is 0, and the step must not make NaN
    shape = (6, 4, 3, 3)
    ours = _make([shape], torch.float32, "input_channel", seed=4)
    ours["params"][0][:, 1].zero_()
    ours["initials"][0][:, 1].zero_()
    ours["duals"][0][:, 1].zero_()
    grads = _grads(ours["params"], seed=5)
    grads[0][:, 1].zero_()
    ref = _clone(ours)
    _step(cpu, ours, grads, "input_channel", lam=0.0)
    _step(reference, ref, grads, "input_channel", lam=0.0)
    _assert_same(ours, ref, torch.float32)
    assert not ours["params"][0].isnan().any()
    assert bool(ours["zero_masks"][0][1]) and int(ours["zero_masks"][0].sum()) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grad_scale_and_found_inf(dtype, device):
    shapes = [(8, 6, 3, 3), (12, 10)]
    ours = _make(shapes, dtype, "input_channel", seed=6, device=device)
    ref = _clone(ours)
    grads = _grads(ours["params"], seed=7)
    scale = torch.tensor(1024.0, device=device)
    no_inf, inf = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    scaled = [(g.double() * 1024).to(dtype) for g in grads]
    _step(_backend(device), ours, scaled, "input_channel", grad_scale=scale, found_inf=no_inf)
    _step(reference, ref, scaled, "input_channel", grad_scale=scale, found_inf=no_inf)
    _assert_same(ours, ref, dtype)
    before = _clone(ours)
    _step(_backend(device), ours, scaled, "input_channel", grad_scale=scale, found_inf=inf)
    for key in before:
        for a, b in zip(ours[key], before[key]):
            assert torch.equal(a, b), key  # not even t moves


@pytest.mark.parametrize("device", DEVICES)
def test_lr_tensor_and_mixed_dtypes_in_one_call(device):
    shapes = [(8, 6, 3, 3), (12, 10), (5, 4)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    ours = {k: [] for k in _make([], torch.float32, "output_channel", 0)}
    for shape, dtype in zip(shapes, dtypes):
        one = _make([shape], dtype, "output_channel", seed=8, device=device)
        for k in ours:
            ours[k] += one[k]
    ref = _clone(ours)
    grads = _grads(ours["params"], seed=9)
    lr = torch.tensor(0.2, device=device)
    _step(_backend(device), ours, grads, "output_channel", lr=lr)
    _step(reference, ref, grads, "output_channel", lr=lr)
    for k in range(3):
        _assert_same({key: [v[k]] for key, v in ours.items()},
                     {key: [v[k]] for key, v in ref.items()}, dtypes[k])


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel", "none"])
def test_channels_last_parameter_runs_fused(grouping, recwarn):
    """A dense permuted layout shared by the parameter, its gradient and its state runs in
    the cpu kernel over the memory-order group view, without a fallback."""
    p = torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)
    ours = _make([p.shape], torch.float32, grouping, seed=10)
    ours["params"][0] = p.clone(memory_format=torch.channels_last)
    ours["initials"][0] = p.clone(memory_format=torch.channels_last)
    ours["duals"][0] = ours["duals"][0].contiguous(memory_format=torch.channels_last)
    ref = _clone(ours)
    grads = [torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)]
    for _ in range(3):
        functional.rmda_step(ours["params"], grads, ours["initials"], ours["duals"],
                             ours["steps"], ours["alphas"], ours["zero_masks"], lr=0.1,
                             momentum=0.3, lam=0.5, grouping=grouping, backend="cpu")
        _step(reference, ref, grads, grouping)
    assert not [w for w in recwarn if "reference" in str(w.message)]
    assert ours["params"][0].is_contiguous(memory_format=torch.channels_last)
    _assert_same(ours, ref, torch.float32)


def test_parameter_whose_state_has_another_layout_goes_to_reference():
    p = torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)
    ours = _make([p.shape], torch.float32, "input_channel", seed=10)
    ours["params"][0] = p.clone(memory_format=torch.channels_last)  # state stays contiguous
    ref = _clone(ours)
    grads = [torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)]
    with pytest.warns(RuntimeWarning, match="another memory layout.*'reference'"):
        functional.rmda_step(ours["params"], grads, ours["initials"], ours["duals"],
                             ours["steps"], ours["alphas"], ours["zero_masks"], lr=0.1,
                             momentum=0.3, lam=0.5, grouping="input_channel", backend="cpu")
    _step(reference, ref, grads, "input_channel")
    _assert_same(ours, ref, torch.float32)


def _op_args(grouping, dtype=torch.float32):
    shapes = [(8, 6, 3, 3), (12, 10)] if grouping != "none" else [(8, 6, 3, 3), (13,)]
    lists = _make(shapes, dtype, grouping, seed=11)
    grads = _grads(lists["params"], seed=12)
    prox = grouping != "none"
    views = [n for s in shapes for n in group_view(s, grouping)] if prox else []
    args = (lists["params"], grads, lists["initials"], lists["duals"], lists["steps"],
            lists["alphas"], lists["zero_masks"] if prox else [], views, 0.1, 0.3,
            0.5 if prox else 0.0)
    return args


@pytest.mark.parametrize("grouping", ["input_channel", "none"])
@pytest.mark.parametrize("amp", [False, True])
def test_opcheck(grouping, amp):
    args = _op_args(grouping)
    kwargs = {}
    if amp:
        kwargs = dict(lr_tensor=torch.tensor(0.1), grad_scale=torch.tensor(2.0),
                      found_inf=torch.tensor(0.0))
    torch.library.opcheck(torch.ops.rmda_fused.rmda_step_.default, args, kwargs)


def test_compiles_under_torch_compile():
    args = _op_args("input_channel")
    expected = [[t.clone() for t in x] if isinstance(x, list) and x and isinstance(x[0], torch.Tensor)
                else x for x in args]
    torch.ops.rmda_fused.rmda_step_(*expected)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(*a):
        torch.ops.rmda_fused.rmda_step_(*a)

    step(*args)
    for got, want in zip(args[0], expected[0]):
        torch.testing.assert_close(got, want)


def test_shape_errors_are_reported():
    args = list(_op_args("input_channel"))
    args[7] = [1, 2, 3, 4, 5, 6]  # views that do not cover the tensors
    with pytest.raises(RuntimeError, match="does not cover"):
        torch.ops.rmda_fused.rmda_step_(*args)


def test_extension_reports_cuda_kernels_consistently():
    assert isinstance(_extension.has_cuda_kernels(), bool)


def test_jit_build_errors_carry_the_compiler_message(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("int broken_symbol = ;\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_extension, "source_root", lambda: tmp_path)
    monkeypatch.setattr(_extension, "build_spec", lambda with_cuda: {
        "sources": ["broken.cpp"], "extra_compile_args": {"cxx": []},
        "extra_link_args": [], "include_dirs": []})
    with pytest.raises(RuntimeError) as info:
        _extension._jit_build(with_cuda=False)
    assert "broken_symbol" in str(info.value) and "error" in str(info.value)


def test_rmda_optimizer_with_cpu_backend_matches_reference():
    from rmda_fused import RMDA, param_groups

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                  torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).double()]
    models.append(__import__("copy").deepcopy(models[0]))
    opts = [RMDA(param_groups(m, 0.05), lr=0.1, momentum=0.2, backend=b)
            for m, b in zip(models, ("cpu", "reference"))]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for _ in range(4):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
