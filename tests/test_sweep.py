"""Global parity (rung 3): the sweep's hypergradient equals the full autograd
unroll's, for random MLPs, optimizers, flags, hyperparameters, J and
meta-parameter choices; and a closed form for SGD on a quadratic.

Oracles: ``gimli.full_unroll_hypergradient`` (create_graph through every step;
itself checked against finite differences of the real torch.optim in
test_oracle.py) and, for the quadratic, the eigenbasis formula below.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import gimli
from optim_db import IDS, OPTIM_DB, OptimRow
from strategies import meta_choices, mse, problems

# the properties cover setups whose hypergradient is identically zero (a truncated θ₀,
# Rprop's φ^loss); gimli warns of those (tests/test_diagnostics.py), not an error here
pytestmark = pytest.mark.filterwarnings("ignore::gimli.GimliWarning")

RTOL = 1e-9
ATOL = 1e-13


def assert_hypergradients_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                                rtol: float = RTOL) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        err = (got[name] - ref[name]).norm().item()
        # the floor ATOL: the losses and the terms the hypergradient sums are O(1) here, and
        # an entry that is a near-total cancellation (Adam is almost invariant to the
        # loss scale) has no relative accuracy, only a few hundred ulps of O(1)
        assert err <= rtol * ref[name].norm().item() + ATOL, \
            f"{name}: |sweep − oracle| = {err:.3e}, |oracle| = {ref[name].norm().item():.3e}"


def build(problem: Any, choice: dict[str, Any], maximize: bool = False) -> gimli.GimliSolver:
    """A solver over the problem with the chosen meta-parameters. φ^loss, when
    chosen, is one L2 coefficient per param tensor and a target scale. A
    maximizing optimizer gets the negated loss, so the unroll stays bounded."""
    sign = -1.0 if maximize else 1.0
    model, opt = problem.model, problem.opt
    n = len(list(model.parameters()))
    loss: dict[str, Any] = {}
    if choice["loss"]:
        loss = {"l2": torch.linspace(0.01, 0.05, n, dtype=torch.float64),
                "scale": torch.tensor(1.1, dtype=torch.float64)}
    meta = gimli.MetaParams(opt, choice["hypers"], loss=loss, init=model if choice["init"] else None)

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        if not choice["loss"]:
            return sign * mse(m, batch)
        x, y = batch
        l2 = meta["l2"]
        penalty = sum(c * (p ** 2).sum() for c, p in zip(l2, m.parameters()))
        return sign * (((m(x) - meta["scale"] * y) ** 2).mean() + penalty)

    return gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=mse)


@pytest.mark.parametrize("row", OPTIM_DB, ids=IDS)
@given(data=st.data())
def test_global_parity(row: OptimRow, data: st.DataObject) -> None:
    problem, kwargs, _ = data.draw(problems(row))
    choice = data.draw(meta_choices(row, kwargs, problem.opt))
    solver = build(problem, choice, kwargs.get("maximize", False))
    try:
        ref = gimli.full_unroll_hypergradient(solver, problem.train, problem.val)
    except FloatingPointError:                  # a diverging unroll: nothing to compare
        assume(False)
    # autograd's √ backward is NaN at an exactly-zero second moment (a dead ReLU
    # unit); the sweep is right there (test_adam_dead_units.py), the oracle is not
    assume(all(torch.isfinite(r).all() for r in ref.values()))
    got = solver.hypergradient(problem.train, problem.val)
    assert_hypergradients_close(got, ref)


class Vector(nn.Module):
    """θ itself: the model of a quadratic inner problem."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self) -> torch.Tensor:
        return self.theta


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_quadratic_sgd_closed_form(steps: int) -> None:
    """ℓ(θ) = ½θᵀAθ − bᵀθ, SGD: in A's eigenbasis (A = QΛQᵀ, z = Qᵀθ) each
    coordinate follows z_J = ρ^J z_0 + (1 − ρ^J) b̃/λ with ρ = 1 − αλ, so
    dz_J/dα = J ρ^{J−1} (b̃ − λ z_0) and dz_J/dz_0 = ρ^J. With L = ½‖θ_J − c‖²,
    dL/dα = (θ_J − c)ᵀ Q dz_J/dα and dL/dθ_0 = Q ρ^J Qᵀ (θ_J − c)."""
    g = torch.Generator().manual_seed(steps)
    d, alpha = 5, 0.1
    R = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = R @ R.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    b, c, theta0 = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))
    model = Vector(theta0.clone())
    opt = torch.optim.SGD(model.parameters(), lr=alpha)
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, init=model)

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        theta = m()
        return 0.5 * theta @ A @ theta - b @ theta

    solver = gimli.GimliSolver(model, loss_fn, opt, meta,
                               val_loss_fn=lambda m, batch, meta: 0.5 * ((m() - c) ** 2).sum())
    got = solver.hypergradient([None] * steps, "val")

    lam, Q = torch.linalg.eigh(A)
    rho = 1 - alpha * lam
    z0, bt = Q.T @ theta0, Q.T @ b
    zJ = rho**steps * z0 + (1 - rho**steps) * bt / lam
    resid = Q @ zJ - c
    d_lr = resid @ (Q @ (steps * rho ** (steps - 1) * (bt - lam * z0)))
    d_theta0 = Q @ (rho**steps * (Q.T @ resid))
    torch.testing.assert_close(got["hypers.lr"], d_lr, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(got["init.theta"], d_theta0, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                        (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1))])
def test_loss_network_as_meta_parameter(cls: type, kwargs: dict[str, Any]) -> None:
    """φ^loss as a whole nn.Module: a network weighting each example's loss, learned
    together with θ₀; the sweep equals the full autograd unroll."""
    from strategies import mlp, regression_batches
    torch.manual_seed(0)
    model, weigher = mlp([3, 4, 1], "tanh"), mlp([3, 3, 1], "softplus")
    opt = cls(model.parameters(), **kwargs)
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, loss={"weigher": weigher}, init=model)

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        x, y = batch
        w = nn.functional.softplus(meta["weigher"](x))
        return (w * (m(x) - y) ** 2).mean()

    solver = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=mse)
    batches = regression_batches(5, 3, 1, 5)
    got = solver.hypergradient(batches[:4], batches[4])
    assert {n for n in got if n.startswith("loss.weigher.")} == \
        {f"loss.weigher.{n}" for n, _ in weigher.named_parameters()}
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, batches[:4], batches[4]))
