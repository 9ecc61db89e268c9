"""Adam (and Adagrad) where some gradient elements are exactly zero at every step (a dead ReLU
unit): v̂ = 0 there, and autograd's √ backward yields 0·∞ = NaN. The closed-form
VJP takes the true limit (proofs/adam.md), so the hypergradient is finite and
equals finite differences of the real ``torch.optim.Adam`` unroll.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gimli
from strategies import mlp, mse, regression_batches
from test_oracle import RTOL, real_unroll_val_loss, richardson, set_hyper

STEPS = 3
NAMES = ["lr", "beta1", "beta2", "eps", "weight_decay"]


ADAM = dict(betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0)
ADAGRAD = dict(eps=1e-3, weight_decay=0.0, initial_accumulator_value=0.0)


@pytest.mark.parametrize("cls,kwargs,names", [
    (torch.optim.Adam, ADAM, NAMES),
    (torch.optim.Adam, {**ADAM, "amsgrad": True}, NAMES),
    (torch.optim.AdamW, ADAM, NAMES),
    (torch.optim.Adagrad, ADAGRAD, ["lr", "lr_decay", "eps", "weight_decay"]),   # Σ' = 0 there
], ids=["Adam", "AMSGrad", "AdamW", "Adagrad"])
def test_dead_units_finite_and_match_finite_differences(cls: type, kwargs: dict,
                                                        names: list[str]) -> None:
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "relu")
    with torch.no_grad():
        model[0].bias[0] = -100.0               # unit 0 never fires: its weights get G = 0
    train_val = regression_batches(3, 2, 1, STEPS + 1)
    train, val = train_val[:STEPS], train_val[-1]
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

        # at weight_decay = 0 the dead weights start to move on a scale set by eps, so
        # the step must be well below eps; the rounding of such a difference of O(1)
        # losses is ~1e-16/1e-5, hence the absolute 1e-10
        fd = richardson(f, x0, 1e-3 * abs(x0) if x0 else 1e-5)
        assert got[f"hypers.{name}"].item() == pytest.approx(fd, rel=RTOL, abs=1e-10), name
    # θ₀ of the dead unit: perturbing it keeps the unit dead, the derivative is exactly 0
    assert torch.all(got["init.0.bias"][0] == 0)
    assert torch.all(got["init.0.weight"][0] == 0)
