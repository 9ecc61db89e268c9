"""Every hyperparameter at every granularity that the README's table claims has a
hypergradient equal to the full autograd unroll's (float64, rtol 1e-9).

The property tests draw random subsets; this one walks the whole table
(``gimli.optim.capabilities()``, the README table's source) on one small
problem per optimizer, so no claimed combination is left to chance.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gimli
from gimli.optim import capabilities
from strategies import Problem, mlp, mse, regression_batches, take_real_steps
from test_sweep import assert_hypergradients_close

# typical settings: every flag that keeps a hyperparameter in play switched on, and every
# clamp and floor in force somewhere (Rprop's step-size bounds, Adafactor's ε₁, ε₂, d)
TYPICAL: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Adam": dict(lr=0.02, eps=1e-3, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.02, eps=1e-3, weight_decay=0.01),
    "Adagrad": dict(lr=0.05, lr_decay=0.1, weight_decay=0.01, eps=1e-3),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.01, momentum=0.5, centered=True),
    "Adadelta": dict(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.01),
    "Adamax": dict(lr=0.02, eps=1e-3, weight_decay=0.01),
    "NAdam": dict(lr=0.02, eps=1e-3, weight_decay=0.01, momentum_decay=5e-3),
    "RAdam": dict(lr=0.02, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.01),
    "Rprop": dict(lr=0.01, step_sizes=(0.004, 0.011)),
    "ASGD": dict(lr=0.02, lambd=1e-3, t0=1.5, weight_decay=0.01),
    "Adafactor": dict(lr=0.02, eps=(0.3, 1.0), d=1.0, weight_decay=0.01),
    "Muon": dict(lr=0.02, weight_decay=0.01, eps=1.0),   # eps clamps the norm: in force
}
# real steps first: RAdam's rectification (ρ_t > 5) is on in the unroll; but none for
# Rprop, whose lr only sets the step size of a fresh optimizer
PRE = {"RAdam": 5, "Rprop": 0}
STEPS = {"Rprop": 8}    # time for two sign flips in a row, so the lower step-size bound binds
CASES = [(opt, hyper, grans) for opt, hypers in capabilities().items() if opt in TYPICAL
         for hyper, grans in hypers.items()]


@pytest.mark.parametrize("opt_name,hyper,granularities", CASES,
                         ids=[f"{o}-{h}" for o, h, _ in CASES])
def test_every_claimed_granularity(opt_name: str, hyper: str, granularities: tuple[str, ...]) -> None:
    cls = getattr(torch.optim, opt_name)
    matrices = opt_name == "Muon"
    pre = PRE.get(opt_name, 2)
    for per in granularities:
        torch.manual_seed(0)
        model = mlp([3, 4, 2], "tanh", bias=not matrices)
        params = list(model.parameters())
        half = len(params) // 2
        second_lr = TYPICAL[opt_name]["lr"] * (1.0 if per == "scalar" else 0.5)
        opt = cls([{"params": params[:half]}, {"params": params[half:], "lr": second_lr}],
                  **TYPICAL[opt_name])
        steps = STEPS.get(opt_name, 4)
        batches = regression_batches(1, 3, 2, pre + steps + 1)
        take_real_steps(Problem(model, opt, batches[:pre], batches[-1]), pre)
        meta = gimli.MetaParams(opt, {hyper: per})
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
        batches = batches[pre:]
        ref = gimli.full_unroll_hypergradient(solver, batches[:steps], batches[steps])
        assert ref[f"hypers.{hyper}"].abs().sum() > 0, "a claim that this problem cannot test"
        assert_hypergradients_close(solver.hypergradient(batches[:steps], batches[steps]), ref)
