"""Adaptive optimizers where some gradient elements are exactly zero at every step
(a dead ReLU unit): the second moment is 0 there, and autograd's √ backward yields
0·∞ = NaN. The closed-form VJPs take the true limit (proofs/adam.md §4 and the
other optimizers' proofs), so the hypergradient is finite and equals finite
differences of the real ``torch.optim`` unroll.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import gimli
from strategies import mlp, mse, regression_batches
from test_oracle import RTOL, real_unroll_val_loss, richardson, set_hyper

STEPS = 3
NAMES = ["lr", "beta1", "beta2", "eps", "weight_decay"]


ADAM = dict(betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0)
ADAGRAD = dict(eps=1e-3, weight_decay=0.0, initial_accumulator_value=0.0)
RMSPROP = dict(alpha=0.9, eps=1e-3, weight_decay=0.0)


# A coupled weight decay at 0 is left out: λ·θ wakes the dead unit up, and θ' then
# depends on λ through |λ| (√ of λ²θ²), a kink at 0 where central differences
# converge only linearly in h. Decoupled (AdamW) has no such kink and is kept.


@pytest.fixture
def float64_default() -> Any:
    """NAdam keeps its μ-product in the default dtype: float64 finite differences need it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("cls,kwargs,names,steps", [
    (torch.optim.Adam, ADAM, NAMES[:4], STEPS),
    (torch.optim.Adam, {**ADAM, "amsgrad": True}, NAMES[:4], STEPS),
    (torch.optim.AdamW, ADAM, NAMES, STEPS),
    (torch.optim.Adagrad, ADAGRAD, ["lr", "lr_decay", "eps"], STEPS),
    (torch.optim.RMSprop, RMSPROP, ["lr", "alpha", "eps"], STEPS),
    (torch.optim.RMSprop, {**RMSPROP, "centered": True, "momentum": 0.5},
     ["lr", "alpha", "eps", "momentum"], STEPS),
    (torch.optim.NAdam, {**ADAM, "momentum_decay": 4e-3}, NAMES[:4] + ["momentum_decay"], STEPS),
    (torch.optim.RAdam, ADAM, NAMES[:4], 8),        # RAdam reads v̂ only once rectified (t ≥ 6)
], ids=["Adam", "AMSGrad", "AdamW", "Adagrad", "RMSprop", "RMSprop-centered", "NAdam", "RAdam"])
def test_dead_units_finite_and_match_finite_differences(cls: type, kwargs: dict, names: list[str],
                                                        steps: int, float64_default: Any) -> None:
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "relu")
    with torch.no_grad():
        model[0].bias[0] = -100.0               # unit 0 never fires: its weights get G = 0
    train_val = regression_batches(3, 2, 1, steps + 1)
    train, val = train_val[:steps], train_val[-1]
    opt = cls(model.parameters(), lr=0.02, **kwargs)
    meta = gimli.MetaParams(opt, names, init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)

    got = solver.hypergradient(train, val)
    assert all(torch.isfinite(g).all() for g in got.values())
    # the motivation: the same derivative by autograd through √ is NaN
    oracle = gimli.full_unroll_hypergradient(solver, train, val)
    assert not all(torch.isfinite(g).all() for g in oracle.values())

    for name in names:
        x0 = meta.hyper(name).item()

        def f(x: float) -> float:
            probe_model, probe = copy.deepcopy((model, opt))
            set_hyper(probe, name, x)
            return real_unroll_val_loss(probe_model, probe, mse, train, val)

        # AdamW's weight_decay is 0 here: a step well below eps, whose rounding on
        # O(1) losses is ~1e-16/1e-5, hence the absolute 1e-10
        fd = richardson(f, x0, 1e-3 * abs(x0) if x0 else 1e-5)
        assert got[f"hypers.{name}"].item() == pytest.approx(fd, rel=RTOL, abs=1e-10), name
    # θ₀ of the dead unit: perturbing it keeps the unit dead, the derivative is exactly 0
    assert torch.all(got["init.0.bias"][0] == 0)
    assert torch.all(got["init.0.weight"][0] == 0)


@pytest.mark.parametrize("cls,kwargs,names,steps", [
    # (forward mode carries one tangent per learned number: at most J of them)
    (torch.optim.Adam, ADAM, NAMES[:4], 5),
    (torch.optim.Adagrad, ADAGRAD, ["lr", "lr_decay", "eps"], STEPS),
    (torch.optim.RMSprop, RMSPROP, ["lr", "alpha", "eps"], STEPS),
    (torch.optim.NAdam, {**ADAM, "momentum_decay": 4e-3}, NAMES[:4], 5),
    (torch.optim.RAdam, ADAM, NAMES[:4], 8),
], ids=["Adam", "Adagrad", "RMSprop", "NAdam", "RAdam"])
def test_dead_units_in_forward_mode(cls: type, kwargs: dict, names: list[str], steps: int,
                                    float64_default: Any) -> None:
    """Forward mode differentiates the closed-form VJP once more (it transposes it): the
    guarded square root's cotangent must stay finite there too, where √ is at 0, and the
    hypergradient is reverse mode's."""
    def solve(mode: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = mlp([2, 4, 1], "relu")
        with torch.no_grad():
            model[0].bias[0] = -100.0           # unit 0 never fires: its weights get G = 0
        batches = regression_batches(3, 2, 1, steps + 1)
        opt = cls(model.parameters(), lr=0.02, **kwargs)
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                                   gimli.MetaParams(opt, names), mode=mode)
        return solver.hypergradient(batches[:steps], batches[-1])

    forward, reverse = solve("forward"), solve("reverse")
    for key, want in reverse.items():
        assert torch.isfinite(forward[key]).all()
        torch.testing.assert_close(forward[key], want, rtol=1e-9, atol=1e-12)
