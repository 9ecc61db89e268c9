"""A hyperparameter learned per inner step (``"step"``, ``"group-step"``): a whole schedule
over the unroll meta-learned at once (Maclaurin et al. 2015).

Oracles, float64: central finite differences of the real training loop, with the real
``torch.optim`` optimizer stepping at the lr of each step (written into its param
groups before each ``step()``); the full autograd unroll
(``gimli.full_unroll_hypergradient``); and, for the scheduler, the real loop with the
scheduler when every step's value is the base lr.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import gimli
from strategies import mlp, regression_batches
from test_sweep import assert_hypergradients_close

J = 5
BATCHES = regression_batches(21, 3, 2, J + 1)
with torch.random.fork_rng():
    torch.manual_seed(3)
    START = mlp([3, 5, 2], "tanh")


def loss(m: Any, batch: Any, meta: Any = None) -> torch.Tensor:
    return F.mse_loss(m(batch[0]), batch[1])


def make(spec: dict[str, str], cls: Any = torch.optim.SGD, scheduler: bool = False,
         **kw: Any) -> gimli.GimliSolver:
    model = copy.deepcopy(START)
    second = {"lr": 0.05} if spec.get("lr") == "group-step" else {}     # ("step": groups agree)
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}],
              **({"lr": 0.1, "momentum": 0.9} if cls is torch.optim.SGD else {"lr": 0.02}))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    meta = gimli.MetaParams(opt, spec, steps=J)
    return gimli.GimliSolver(model, loss, opt, meta, scheduler=sched,
                             meta_opt=torch.optim.SGD(meta.parameters(), lr=1e-3), **kw)


def real_val(lrs: torch.Tensor) -> float:
    """L^val after the real loop, stepping at lrs[j, g] in group g at step j."""
    model = copy.deepcopy(START)
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                          lr=0.1, momentum=0.9)
    for j, batch in enumerate(BATCHES[:J]):
        for g, group in enumerate(opt.param_groups):
            group["lr"] = float(lrs[j, g])
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
    with torch.no_grad():
        return loss(model, BATCHES[J]).item()


def test_a_schedule_per_group_equals_finite_differences_of_the_real_loop() -> None:
    solver = make({"lr": "group-step"})
    got = solver.hypergradient(BATCHES[:J], BATCHES[J])["hypers.lr"]
    assert got.shape == (J, 2)
    lrs = torch.tensor([[0.1, 0.05]] * J, dtype=torch.float64)
    h = 1e-6
    for j, g in [(0, 0), (2, 1), (J - 1, 0), (J - 1, 1)]:
        up, down = lrs.clone(), lrs.clone()
        up[j, g] += h
        down[j, g] -= h
        fd = (real_val(up) - real_val(down)) / (2 * h)
        assert got[j, g].item() == pytest.approx(fd, rel=1e-6, abs=1e-10), (j, g)
    assert got.abs().min() > 0                      # every step's lr matters


@pytest.mark.parametrize("spec,cls", [({"lr": "step", "momentum": "group-step"}, torch.optim.SGD),
                                      ({"lr": "group-step", "beta1": "step", "beta2": "scalar"},
                                       torch.optim.Adam)])
def test_per_step_equals_the_autograd_unroll(spec: dict[str, str], cls: Any) -> None:
    for kw in [{}, {"memory": "budget", "snapshots": 2}, {"truncate": 3}]:
        solver = make(spec, cls, **kw)
        got = solver.hypergradient(BATCHES[:J], BATCHES[J])
        assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, BATCHES[:J], BATCHES[J]))
        if "truncate" in kw:                        # the steps before J − K get no hypergradient
            assert (got["hypers.lr"][:J - 3] == 0).all() and got["hypers.lr"][J - 3:].abs().sum() > 0


def test_with_a_scheduler_each_value_is_that_steps_base_lr() -> None:
    solver = make({"lr": "step"}, scheduler=True)
    got = solver.hypergradient(BATCHES[:J], BATCHES[J])
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, BATCHES[:J], BATCHES[J]))
    # with every step's value the base lr, the unroll is the real loop with the scheduler
    # (scalar: the groups must agree, so both start at 0.1 here)
    model = copy.deepcopy(START)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    mine = gimli.GimliSolver(model, loss, opt, gimli.MetaParams(opt, {"lr": "step"}, steps=J),
                             scheduler=sched)
    real = copy.deepcopy(START)
    real_opt = torch.optim.SGD(real.parameters(), lr=0.1, momentum=0.9)
    real_sched = torch.optim.lr_scheduler.StepLR(real_opt, step_size=2, gamma=0.5)
    mine.hypergradient(BATCHES[:J], BATCHES[J], commit=True)
    for batch in BATCHES[:J]:
        real_opt.zero_grad()
        loss(real, batch).backward()
        real_opt.step()
        real_sched.step()
    for p, q in zip(model.parameters(), real.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_meta_steps_with_commit_keep_the_optimizers_own_lr() -> None:
    solver = make({"lr": "group-step"})
    before = [g["lr"] for g in solver.problem.inner.torch_optimizer.param_groups]
    start = solver.meta.hyper("lr").detach().clone()
    for k in range(2):
        solver.step(BATCHES[:J], BATCHES[J], commit=True)
    assert not torch.equal(solver.meta.hyper("lr").detach(), start)       # the schedule moved
    # a schedule over the unroll is not one value to write into the param groups
    assert [g["lr"] for g in solver.problem.inner.torch_optimizer.param_groups] == before


def test_per_step_arguments() -> None:
    model = copy.deepcopy(START)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="learned per step: give steps=J"):
        gimli.MetaParams(opt, {"lr": "step"})
    with pytest.raises(ValueError, match="steps= is for a hyperparameter learned per 'step'"):
        gimli.MetaParams(opt, {"lr": "scalar"}, steps=3)
    solver = gimli.GimliSolver(model, loss, opt, gimli.MetaParams(opt, {"lr": "step"}, steps=3))
    with pytest.raises(ValueError, match="over 3 steps .* this unroll has 5"):
        solver.hypergradient(BATCHES[:J], BATCHES[J])
    with pytest.raises(ValueError, match="per step has one per step"):
        gimli.GimliSolver(model, loss, opt, gimli.MetaParams(opt, {"lr": "step"}, steps=3), mode="forward")


def test_the_checker_takes_a_schedule_learned_per_step() -> None:
    solver = make({"lr": "group-step", "momentum": "step"})
    report = gimli.check(solver, BATCHES[:J], BATCHES[J])
    assert report.passed, report
