"""Rung 4: the oracle (full autograd unroll) equals central finite differences of
the REAL ``torch.optim`` unroll, on scalar hyperparameters and a loss parameter.

Oracle of the oracle: J steps of the user's torch.optim optimizer itself
(``zero_grad``/``backward``/``step``) at φ ± h, differenced. Richardson
extrapolation of two central differences (h and h/2) cancels the h² error term,
leaving O(h⁴) ≈ 1e-12 relative plus rounding ≈ 1e-16/h; hence RTOL = 1e-8.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import gimli
from strategies import mlp, mse, regression_batches

RTOL = 1e-8
STEPS = 4

CASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.1, weight_decay=0.02), ["lr", "momentum", "dampening", "weight_decay"]),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.8, nesterov=True), ["lr", "momentum"]),
    (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05, amsgrad=True), ["lr", "beta1", "beta2", "eps", "weight_decay"]),
    (torch.optim.AdamW, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05), ["lr", "beta1", "beta2", "eps", "weight_decay"]),
    (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.1, eps=1e-3, weight_decay=0.05, initial_accumulator_value=0.1), ["lr", "lr_decay", "eps", "weight_decay"]),
]


def set_hyper(opt: torch.optim.Optimizer, name: str, value: float) -> None:
    for group in opt.param_groups:
        if name in ("beta1", "beta2"):
            betas = list(group["betas"])
            betas[name == "beta2"] = value
            group["betas"] = tuple(betas)
        else:
            group[name] = value


def real_unroll_val_loss(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Any,
                         batches: list[Any], val: Any) -> float:
    """L^val after J steps of the real torch.optim optimizer, on copies."""
    model, opt = copy.deepcopy((model, opt))    # one deepcopy: opt keeps pointing at model
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    with torch.no_grad():
        return mse(model, val).item()


def richardson(f: Any, x: float, h: float) -> float:
    d1 = (f(x + h) - f(x - h)) / (2 * h)
    d2 = (f(x + h / 2) - f(x - h / 2)) / h
    return (4 * d2 - d1) / 3


@pytest.mark.parametrize("cls,kwargs,names", CASES, ids=[c[0].__name__ for c in CASES])
def test_oracle_matches_finite_differences(cls: type, kwargs: dict[str, Any], names: list[str]) -> None:
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "tanh")
    batches = regression_batches(1, 2, 1, STEPS + 1)
    train, val = batches[:STEPS], batches[-1]
    opt = cls(model.parameters(), **kwargs)
    meta = gimli.MetaParams(opt, names)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    oracle = gimli.full_unroll_hypergradient(solver, train, val)
    for name in names:
        x0 = meta.hyper(name).item()

        def f(x: float) -> float:
            probe_model, probe = copy.deepcopy((model, opt))
            set_hyper(probe, name, x)
            return real_unroll_val_loss(probe_model, probe, mse, train, val)

        fd = richardson(f, x0, 1e-3 * abs(x0))
        assert oracle[f"hypers.{name}"].item() == pytest.approx(fd, rel=RTOL, abs=1e-12), name


def test_oracle_matches_finite_differences_loss_parameter() -> None:
    """φ^loss: an L2 coefficient read by the training loss only."""
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "softplus")
    batches = regression_batches(2, 2, 1, STEPS + 1)
    train, val = batches[:STEPS], batches[-1]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    c0 = 0.3
    meta = gimli.MetaParams(loss={"l2": torch.tensor(c0, dtype=torch.float64)})

    def penalised(m: Any, batch: Any, c: Any) -> torch.Tensor:
        return mse(m, batch) + c * sum((p ** 2).sum() for p in m.parameters())

    solver = gimli.GimliSolver(model, lambda m, b, meta: penalised(m, b, meta["l2"]), opt, meta,
                               val_loss_fn=mse)
    oracle = gimli.full_unroll_hypergradient(solver, train, val)
    fd = richardson(lambda c: real_unroll_val_loss(model, opt, lambda m, b: penalised(m, b, c),
                                                   train, val), c0, 1e-3)
    assert oracle["loss.l2"].item() == pytest.approx(fd, rel=RTOL)
    assert solver.hypergradient(train, val)["loss.l2"].item() == pytest.approx(fd, rel=RTOL)
