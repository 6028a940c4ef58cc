"""ProxSGD: torch SGD with momentum, then the group soft-threshold at lr * lam."""
import math

import pytest
import torch

import rmda_fused


def _soft_threshold_columns(w: torch.Tensor, tau: float) -> torch.Tensor:
    """Input-channel group LASSO prox of a (O, I, k, k) or (O, I) weight, written out per group."""
    out = w.clone()
    size = w[:, 0].numel()
    for i in range(w.shape[1]):
        n = float(w[:, i].norm())
        thr = tau * math.sqrt(size)
        out[:, i] = w[:, i] * (max(0.0, n - thr) / n if n > 0 else 0.0)
    return out


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 9)])
def test_matches_sgd_then_prox(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    w[:, 1] *= 1e-3  # a group the prox must zero
    p = torch.nn.Parameter(w.clone())
    q = torch.nn.Parameter(w.clone())
    lr, lam = 0.05, 0.2
    prox = rmda_fused.ProxSGD([p], lr=lr, momentum=0.9, lam=lam)
    sgd = torch.optim.SGD([q], lr=lr, momentum=0.9)
    for _ in range(15):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g[:, 1] *= 1e-3
        p.grad, q.grad = g.clone(), g.clone()
        prox.step()
        sgd.step()
        with torch.no_grad():
            q.copy_(_soft_threshold_columns(q, lr * lam))
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    zero = prox.state[p]["zero_mask"]
    assert zero[1] and not zero.all()
    assert torch.equal(zero, torch.tensor([bool((q[:, i] == 0).all()) for i in range(shape[1])]))


def test_state_dict_keeps_bool_masks_and_validation():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = rmda_fused.ProxSGD([p], lr=0.1, lam=0.1)
    p.grad = torch.randn(4, 3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.state[p]["zero_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="weight_decay"):
        rmda_fused.ProxSGD([p], lr=0.1, weight_decay=1e-4)
    # like RMDA: a 1-D tensor has no channel groups, so it is not regularized
    bias = torch.nn.Parameter(torch.randn(4))
    opt = rmda_fused.ProxSGD([bias], lr=0.1, lam=0.1)
    bias.grad = torch.randn(4)
    opt.step()
    assert "zero_mask" not in opt.state[bias]
