"""Learning-rate schedules inside the unroll.

Oracles: the real ``torch.optim.lr_scheduler`` stepping the real optimizer (its
learning rates and momenta step by step, and its training run for finite
differences), and the full autograd unroll for hypergradients.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable

import pytest
import torch
from torch.optim import lr_scheduler as L

import gimli
from strategies import mlp, mse, regression_batches
from test_oracle import richardson
from test_sweep import assert_hypergradients_close

STEPS = 5
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: L.LambdaLR(o, lambda t: 1.0 / (1.0 + 0.3 * t)),
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[1, 4, 6], gamma=0.3),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=6, eta_min=0.01),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=5),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.3, total_steps=12),
}


def build(name: str, lr: float = 0.1, pre_steps: int = 2, seed: int = 0) -> tuple[Any, ...]:
    """Model, SGD-with-momentum optimizer (two groups), scheduler, after ``pre_steps``
    real training steps; and data."""
    torch.manual_seed(seed)
    model = mlp([2, 4, 1], "tanh")
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}],
                          lr=lr, momentum=0.9)
    sched = SCHEDULERS[name](opt)
    batches = regression_batches(seed, 2, 1, pre_steps + STEPS + 1)
    for batch in batches[:pre_steps]:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
        sched.step()
    return model, opt, sched, batches[pre_steps:pre_steps + STEPS], batches[-1]


def real_run(model: Any, opt: Any, sched: Any, train: list[Any]) -> tuple[list[Any], Any]:
    """J steps of the real optimizer and scheduler on copies: the (lr, momentum) of each
    group at each step, and the trained model."""
    model, opt, sched = copy.deepcopy((model, opt, sched))
    seen = []
    with warnings.catch_warnings():     # the copy's step is not the one the scheduler wrapped
        warnings.simplefilter("ignore")
        for batch in train:
            seen.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
            sched.step()
    return seen, model


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_replays_the_real_scheduler(name: str) -> None:
    model, opt, sched, train, val = build(name)
    meta = gimli.MetaParams(opt, {"lr": "group"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse)
    schedule = solver.problem.schedule(STEPS)
    hp = solver.problem.hypers(differentiable=False)
    seen, trained = real_run(model, opt, sched, train)
    first = [sl.start for sl in solver.problem.inner.groups]
    for j in range(STEPS):
        hp_j = schedule.at(j, hp)
        for g, i in enumerate(first):
            assert hp_j["lr"][i].item() == pytest.approx(seen[j][g][0], rel=1e-12)
            assert hp_j["momentum"][i].item() == pytest.approx(seen[j][g][1], rel=1e-12)
    # the unroll ends where real training ends: the same validation loss; and neither
    # the unroll nor a meta-step that leaves the base lr as it is moves the scheduler
    epoch, lrs = sched.last_epoch, [g["lr"] for g in opt.param_groups]
    solver.meta_opt = torch.optim.SGD(meta.parameters(), lr=0.0)
    assert solver.step(train, val).val_loss == pytest.approx(mse(trained, val).item(), rel=1e-10)
    assert sched.last_epoch == epoch
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs, rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_hypergradients_match_oracle(name: str) -> None:
    model, opt, sched, train, val = build(name)
    learn = {} if name == "OneCycleLR" else {"momentum": "scalar"}   # OneCycle cycles momentum
    meta = gimli.MetaParams(opt, {"lr": "group", **learn}, init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse)
    last_epoch = sched.last_epoch
    got = solver.hypergradient(train, val)
    assert sched.last_epoch == last_epoch           # an unroll does not advance the scheduler
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, train, val))


@pytest.mark.parametrize("name", ["ExponentialLR", "CosineAnnealingLR", "OneCycleLR"])
def test_base_lr_hypergradient_matches_finite_differences(name: str) -> None:
    """d L^val / d(base lr): the real scheduler built over an optimizer whose lr is
    φ ± h (OneCycleLR: its max_lr scaled alike), trained for J steps."""
    phi = 0.1

    _, _, _, train, val = build(name, pre_steps=0)

    def val_loss(x: float) -> float:
        torch.manual_seed(0)
        model = mlp([2, 4, 1], "tanh")
        params = list(model.parameters())
        opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=x, momentum=0.9)
        sched = SCHEDULERS[name](opt) if name != "OneCycleLR" else \
            L.OneCycleLR(opt, max_lr=0.3 * x / phi, total_steps=12, cycle_momentum=False)
        _, trained = real_run(model, opt, sched, train)
        return mse(trained, val).item()

    torch.manual_seed(0)
    model = mlp([2, 4, 1], "tanh")
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=phi, momentum=0.9)
    sched = SCHEDULERS[name](opt) if name != "OneCycleLR" else \
        L.OneCycleLR(opt, max_lr=0.3, total_steps=12, cycle_momentum=False)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse)
    base = meta.hyper("lr").item()
    fd = richardson(val_loss, base, 1e-3 * base) if name != "OneCycleLR" else \
        richardson(lambda x: val_loss(x * phi / base), base, 1e-3 * base)
    assert solver.hypergradient(train, val)["hypers.lr"].item() == pytest.approx(fd, rel=1e-7)


def test_step_rebases_the_scheduler() -> None:
    """After a meta-step the user's scheduler runs from the learned base lr: its lrs
    equal those of a scheduler built with that base from the start."""
    model, opt, sched, train, val = build("StepLR", pre_steps=3)
    meta = gimli.MetaParams(opt, {"lr": "group"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse, meta_opt=torch.optim.SGD(meta.parameters(), lr=0.05))
    solver.step(train, val)
    learned = meta.hyper("lr").detach().tolist()
    assert learned != [0.1, 0.05]
    fresh_opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in learned], momentum=0.9)
    fresh = SCHEDULERS["StepLR"](fresh_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            fresh.step()
        for _ in range(4):
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in fresh_opt.param_groups], rel=1e-12)
            sched.step()
            fresh.step()


def test_scheduler_must_be_passed_when_lr_is_learned() -> None:
    model, opt, sched, train, val = build("StepLR")
    with pytest.raises(ValueError, match="scheduler="):
        gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, {"lr": "group"}))
    with pytest.raises(ValueError, match="cannot be meta-learned"):
        m2, o2, s2, t2, v2 = build("OneCycleLR")
        gimli.GimliSolver(m2, lambda m, b, meta: mse(m, b), o2, gimli.MetaParams(o2, {"momentum": "scalar"}),
                          scheduler=s2).hypergradient(t2, v2)
    assert math.isfinite(sched.get_last_lr()[0])
