"""One training run of the paper comparison: data, models, optimizers, and what is recorded.

A run is (case, method, lam, seed). Within one seed every method starts from the same
initial weights and sees the same data split and batch order, so the methods are compared
pairwise, not only on average.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rmda_fused import RMDA, IdentificationTracker, MultiStepRestart, ProxSGD, param_groups
from rmda_fused.datasets import load_digits_split
from rmda_fused.structure import group_sparsity

# ProxSGD: torch's SGD (heavy-ball momentum 0.9) then the prox with threshold lr*lam, the
#   library's baseline. Its momentum buffer tends to g/(1-0.9) = 10 g while the threshold stays
#   lr*lam, so its fixed points are those of f + (lam/10)*psi: at equal lam it is regularized
#   10x less than RMDA, and equal-lam rows are not a like-for-like comparison.
# ProxSGD-ema: the same with dampening 0.9 (momentum as an average of gradients, as in Yang et
#   al.'s ProxSGD) and 10x the lr, so its gradient steps are exactly the heavy-ball ones but
#   its fixed points are those of f + lam*psi, RMDA's objective.
# SGD: no regularizer, the accuracy ceiling.
METHODS = ("RMDA", "ProxSGD", "ProxSGD-ema", "SGD")


@dataclass(frozen=True)
class Case:
    """Everything that defines one experiment, shared by all methods and seeds."""
    name: str
    epochs: int
    milestones: tuple[int, ...]
    lams: tuple[float, ...]
    lr: dict[str, float]        # per method: RMDA's lr is its s_t = lr*sqrt(t) base, not SGD's
    batch_size: int = 64
    rmda_momentum: float = 0.1  # c, the authors' default; 'iclr' makes it 1 at the first milestone
    sgd_momentum: float = 0.9


@dataclass
class Run:
    case: str
    method: str
    lam: float
    seed: int
    # per epoch (index e is the end of epoch e+1)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    sparsity_z: list[float] = field(default_factory=list)
    sparsity_W: list[float] = field(default_factory=list)
    flips_epoch: list[int] = field(default_factory=list)   # z pattern, epoch end vs epoch end
    flips_steps: list[int] = field(default_factory=list)   # sum of step-to-step flips in the epoch
    momentum: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    # final
    last_change_epoch: int | None = None
    last_change_step: int | None = None
    steps: int = 0
    final_accuracy: float = 0.0         # of the exactly structured model (W <- z for RMDA)
    final_accuracy_iterate: float = 0.0  # of the last iterate W, before that
    final_sparsity_z: float = 0.0
    final_sparsity_W: float = 0.0        # of the last iterate W, before W <- z
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_model(case: str) -> nn.Module:
    if case == "logistic":
        # multinomial logistic regression: a Linear(64, 10); its input-channel groups are the
        # 10-entry columns, one per pixel, so group sparsity = fraction of pixels ignored
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    if case == "rescnn":
        return ResidualCNN()
    if case == "cnn":
        # small, so 3 seeds x 9 runs fit in minutes on CPU; 1 + 16 + 128 input-channel groups
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 4 x 4
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
            nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
        )
    raise ValueError(f"unknown case {case!r}")


class ResidualCNN(nn.Module):
    """A small ResNet for 8x8 digits: a stem, two residual blocks at 16 channels (identity
    shortcuts: one residual stream read by four convs) and one at 32 with a 1x1 projection.
    Its channels are coupled across layers, which is what coupled groups are for."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.blocks = nn.ModuleList([_Block(16, 16, 1), _Block(16, 16, 1), _Block(16, 32, 2)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs),
            nn.ReLU(), nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs))
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _groups(model: nn.Module, lam: float, grouping: str, example: torch.Tensor | None):
    if grouping == "coupled":
        return param_groups(model, lam, "coupled", example_inputs=example)
    return param_groups(model, lam, grouping)


def make_optimizer(case: Case, method: str, lam: float, model: nn.Module,
                   grouping: str = "input_channel", example: torch.Tensor | None = None):
    """The optimizer and its lr scheduler. All three decay lr by 0.1 at the same milestones.
    ``example``: a batch, which coupled groups trace the model with."""
    lr = case.lr[method]
    if method == "RMDA":
        opt = RMDA(_groups(model, lam, grouping, example), lr=lr, momentum=case.rmda_momentum)
        # the authors' restart: W0 <- W at each milestone, and c <- min(c/0.1, 1)
        sched = MultiStepRestart(opt, list(case.milestones), gamma=0.1, momentum_schedule="iclr")
        return opt, sched
    if method in ("ProxSGD", "ProxSGD-ema", "SGD"):
        # plain SGD is ProxSGD with lam = 0: its prox is then the identity, and it records a
        # (never-zero) pattern like the others, so one code path reports on all of them
        lam = 0.0 if method == "SGD" else lam
        dampening = case.sgd_momentum if method == "ProxSGD-ema" else 0.0
        opt = ProxSGD(_groups(model, lam, grouping, example), lr=lr,
                      momentum=case.sgd_momentum, dampening=dampening)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(case.milestones), gamma=0.1)
        return opt, sched
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(case: Case, method: str, lam: float, seed: int, grouping: str = "input_channel",
          keep_model: bool = False) -> Run | tuple[Run, nn.Module]:
    """One run; with ``keep_model``, (run, the final model) (W <- z for RMDA)."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed, per_pixel=True)
    torch.manual_seed(seed)  # same init for every method of this seed
    model = make_model(case.name)
    opt, sched = make_optimizer(case, method, lam, model, grouping, x_train[:2])
    # two trackers: per step (the theorem's "finitely many steps") and per epoch (the plots)
    per_step, per_epoch = IdentificationTracker(opt), IdentificationTracker(opt)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)  # same batch order for every method
    run = Run(case=case.name, method=method, lam=lam if method != "SGD" else 0.0, seed=seed)
    step, epoch_end_steps = 0, []
    for epoch in range(1, case.epochs + 1):
        total = 0.0
        for batch in torch.randperm(len(y_train), generator=order).split(case.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step()
            step += 1
            per_step.update(step)
            total += loss.item() * len(batch)
        run.lr.append(opt.param_groups[0]["lr"])
        run.momentum.append(opt.param_groups[0]["momentum"])
        sched.step()  # after the epoch, like the authors: a milestone restarts RMDA here
        per_epoch.update(epoch)
        run.loss.append(total / len(y_train))
        run.accuracy.append(_accuracy(model, x_test, y_test))
        run.sparsity_z.append(group_sparsity(opt, "z").fraction)
        run.sparsity_W.append(group_sparsity(opt, "W").fraction)
        epoch_end_steps.append(step)
    step_flips = per_step.flips  # read once at the end: one host sync, not one per step
    run.flips_steps = [sum(step_flips[a:b]) for a, b in zip([0] + epoch_end_steps, epoch_end_steps)]
    run.flips_epoch = per_epoch.flips
    run.last_change_epoch, run.last_change_step = per_epoch.last_change, per_step.last_change
    run.steps = step
    run.final_accuracy_iterate = run.accuracy[-1]
    run.final_sparsity_z, run.final_sparsity_W = run.sparsity_z[-1], run.sparsity_W[-1]
    if method == "RMDA":
        opt.apply_prox_point()  # W <- z: the exactly structured model one would deploy
    run.final_accuracy = _accuracy(model, x_test, y_test)
    run.seconds = time.perf_counter() - start
    return (run, model) if keep_model else run
