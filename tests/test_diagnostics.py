"""The paper's Requirements I–III (§2.4) as diagnostics, and clear errors for bad input.

Each case builds a setup that breaks one thing and checks the message names it (the
oracle is the setup itself: each is broken by construction), and that a sound setup
gets no warning (pytest turns warnings into errors)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gimli
from strategies import mlp, mse, regression_batches


def parts(cls: type = torch.optim.SGD, **kw: Any) -> tuple[nn.Module, torch.optim.Optimizer, list[Any]]:
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "tanh")
    params = list(model.parameters())
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], lr=kw.pop("lr", 0.1), **kw)
    return model, opt, regression_batches(0, 2, 1, 4)


def penalised(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
    return mse(m, batch) + meta["c"] * sum((p ** 2).sum() for p in m.parameters())


C = {"c": torch.tensor(0.01, dtype=torch.float64)}


# --- Requirement I: L^val must depend on θ ------------------------------------------------
@pytest.mark.parametrize("val_loss_fn", [
    lambda m, b, meta: mse(m, b).detach(),                              # no graph at all
    lambda m, b, meta: mse(m, b).detach() + 0 * torch.ones((), dtype=torch.float64, requires_grad=True),
])
def test_validation_loss_without_theta(val_loss_fn: Any) -> None:
    model, opt, batches = parts()
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                               gimli.MetaParams(opt, {"lr": "group"}), val_loss_fn=val_loss_fn)
    with pytest.raises(ValueError, match="Requirement I.*val_loss_fn"):
        solver.hypergradient(batches[:3], batches[3])


# --- Requirement II: the update must be differentiable in G ---------------------------------
def test_rprop_with_loss_parameters_warns() -> None:
    model, opt, _ = parts(torch.optim.Rprop, lr=0.01)
    with pytest.warns(gimli.GimliWarning, match="Rprop uses only the sign.*Requirement II"):
        gimli.GimliSolver(model, penalised, opt, gimli.MetaParams(loss=C))
    gimli.GimliSolver(model, penalised, opt, gimli.MetaParams(opt, {"lr": "group"}))  # silent


# --- Requirement IIIb: G_j must depend on φ^loss ---------------------------------------------
@pytest.mark.parametrize("loss_fn", [
    lambda m, b, meta: mse(m, b),                                       # never read
    lambda m, b, meta: mse(m, b) + meta["c"] ** 2,                      # read, but not with θ
])
def test_loss_parameter_that_reaches_no_gradient_warns_once(loss_fn: Any) -> None:
    model, opt, batches = parts()
    meta = gimli.MetaParams(opt, {"lr": "group"}, loss=C)
    solver = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=lambda m, b, meta: mse(m, b))
    with pytest.warns(gimli.GimliWarning, match="loss.c reaches no gradient.*Requirement IIIb"):
        got = solver.hypergradient(batches[:3], batches[3])
    assert float(got["loss.c"]) == 0.0 and float(got["hypers.lr"].abs().sum()) > 0
    solver.hypergradient(batches[:3], batches[3])                       # said once: no warning now


def test_loss_parameter_read_by_the_validation_loss_only_is_fine() -> None:
    model, opt, batches = parts()
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b) + meta["c"] ** 2, opt,
                               gimli.MetaParams(opt, {"lr": "group"}, loss=C))  # L^val = loss_fn
    assert float(solver.hypergradient(batches[:3], batches[3])["loss.c"]) != 0.0


def test_truncation_cutting_theta0_warns() -> None:
    model, opt, batches = parts()
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                               gimli.MetaParams(opt, {"lr": "group"}, init=model), truncate=2)
    with pytest.warns(gimli.GimliWarning, match="truncate=2 < J = 3.*θ₀"):
        got = solver.hypergradient(batches[:3], batches[3])
    assert float(got["init.0.weight"].abs().sum()) == 0.0
    solver.hypergradient(batches[:2], batches[3])                       # J = K: nothing cut


# --- bad input --------------------------------------------------------------------------------
def test_parameters_modified_in_place_inside_loss_fn() -> None:
    model, opt, batches = parts()

    def sneaky(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        with torch.no_grad():
            next(iter(m.parameters())).mul_(0.5)
        return mse(m, batch)

    solver = gimli.GimliSolver(model, sneaky, opt, gimli.MetaParams(opt, {"lr": "group"}),
                               val_loss_fn=lambda m, b, meta: mse(m, b))
    with pytest.raises(ValueError, match="in place"):
        solver.hypergradient(batches[:3], batches[3])


def test_diverging_unroll_names_the_hyperparameters() -> None:
    model, opt, batches = parts(lr=1e150)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                               gimli.MetaParams(opt, {"lr": "group"}))
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d of the unroll.*diverged.*lr=1e\+150"):
        solver.hypergradient(batches[:3], batches[3])


def test_meta_parameters_in_another_dtype_or_device() -> None:
    model, opt, _ = parts()
    with pytest.raises(ValueError, match="loss.c is torch.float32.*torch.float64"):
        gimli.GimliSolver(model, penalised, opt, gimli.MetaParams(loss={"c": torch.tensor(0.01)}))
    learned = gimli.LearnedOptimizer(model.parameters())            # its network is float32
    with pytest.raises(ValueError, match="hypers.net.*float32"):
        gimli.GimliSolver(model, penalised, learned, gimli.MetaParams(learned, {"net": "scalar"}))
    meta = gimli.MetaParams(loss={"c": torch.tensor(0.01, dtype=torch.float64, device="meta")})
    with pytest.raises(ValueError, match="loss.c is on meta.*cpu"):
        gimli.GimliSolver(model, penalised, opt, meta)


def test_meta_parameter_of_the_wrong_shape() -> None:
    model, opt, batches = parts()
    meta = gimli.MetaParams(opt, {"lr": "group"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    meta.hypers.lr.data = torch.full((3,), 0.1, dtype=torch.float64)    # 2 param groups
    with pytest.raises(ValueError, match=r"hypers.lr has shape \(3,\).*'group'.*\(2,\)"):
        solver.hypergradient(batches[:3], batches[3])
