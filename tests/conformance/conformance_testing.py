"""Shared by the conformance tests: a small problem, gradients, and state comparisons."""
from __future__ import annotations

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau

# group options added after RMDA's first state dicts; an older dict lacks them
NEWER_OPTIONS = ("maximize", "skip_nonfinite", "weight_decay", "foreach", "fused",
                 "capturable", "differentiable")

# the configs with c near 1 are meant (RMDA warns once, as it should); strided parameters
# run on 'reference' inside a fused backend's step, as documented
CONFORMANCE_MARKS = [
    pytest.mark.filterwarnings("ignore:RMDA. momentum c=:UserWarning"),
    pytest.mark.filterwarnings("ignore:rmda_fused. backend .* cannot take:RuntimeWarning"),
]


# -- a small problem and helpers -------------------------------------------------------------

def linear_problem(device="cpu", seed=0, contiguous=True, dtype=torch.float32):
    """weight (4, 3), bias (4,) and the loss sum((weight @ x + bias)^2) with |x| = 1, so
    its curvature L is at most 2(|x|^2 + 1) = 4. With c = 1 a step moves W by about
    -lr * g (plus a pull back towards W0), so like SGD it needs lr < 2/L; every config
    here stays below that."""
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight, bias = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    else:  # strided views, as torch's suite uses
        weight = torch.randn(4, 3, 2, generator=gen)[..., 0]
        bias = torch.randn(4, 2, generator=gen)[..., 0]
    x = torch.randn(3, generator=gen)
    x = (x / x.norm()).to(device, dtype)
    weight = Parameter(weight.to(device, dtype))
    bias = Parameter(bias.to(device, dtype))

    def loss_fn():
        return (weight.mv(x) + bias).pow(2).sum()
    return weight, bias, loss_fn


def tiny_params(device="cpu", seed=0, shapes=((4, 3), (4,))):
    gen = torch.Generator().manual_seed(seed)
    return [Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def assert_same(a, b, where="state_dict"):
    """a and b hold the same structure and exactly the same values, dtypes and shapes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_steps(opt, loss_fn, steps, schedulers=()):
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        for scheduler in schedulers:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss.item())
            else:
                scheduler.step()


def fresh(kwargs):
    """The config with a tensor lr of its own (schedulers change a tensor lr in place)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
