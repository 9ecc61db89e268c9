"""A bfloat16 (or float16) model trains under gimli where torch.optim trains it: the
hyperparameters are kept in float32, as torch.optim keeps them as Python floats (bfloat16
rounds β₂ = 0.999 to 1, and Adam's bias correction 1 − β₂ᵗ to 0: NaN at the first step).

Oracles: torch.optim's own bfloat16 training on the same batches, and float64 training from
the same (bfloat16-representable) start, the exact values both approximate.

The tolerance: a bfloat16 run is off the exact (float64) trajectory by
E = max|θ_torch − θ_f64|, the error of torch.optim's own bfloat16 training: θ and the
state are stored with 8 significant bits (unit roundoff u = 2⁻⁸), and an adaptive
optimizer turns the rounding of a near-zero gradient into a whole step (Adam's m/√v,
Rprop's sign), so E is not a few u·|θ| but depends on the optimizer and the problem.
gimli's bfloat16 unroll must be as accurate: max|θ_gimli − θ_f64| ≤ 2E + u·max|θ|, and
so, by the triangle inequality, max|θ_gimli − θ_torch| ≤ 3E + u·max|θ|: it stays as
close to torch.optim's bfloat16 training as bfloat16 itself allows. A hyperparameter off
by bfloat16's rounding (β₂ = 0.999 → 1) fails this by far: NaN at the first step.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from gimli.optim import capabilities
from gimli.optim.learned import default_net

U = 2.0 ** -8                   # bfloat16's unit roundoff (8 significant bits)
J = 8
SETTINGS: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Adam": dict(lr=1e-2, weight_decay=0.01), "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adagrad": dict(lr=0.05, lr_decay=0.01, weight_decay=0.01),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.01),
    "Adadelta": dict(lr=0.5, weight_decay=0.01), "Adamax": dict(lr=1e-2, weight_decay=0.01),
    "NAdam": dict(lr=1e-2, weight_decay=0.01), "RAdam": dict(lr=1e-2, weight_decay=0.01),
    "Rprop": dict(lr=1e-2), "ASGD": dict(lr=0.05, t0=1.0, weight_decay=0.01),
    "Adafactor": dict(lr=1e-2, weight_decay=0.01), "Muon": dict(lr=0.02, weight_decay=0.01),
    "LearnedOptimizer": dict(lr=0.05, beta=0.9),
}


def problem(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, list[Any]]:
    """A tanh MLP (bias-free for Muon) in ``dtype`` and J + 1 batches, from a start and data
    that bfloat16 represents exactly (so every dtype starts from the very same point)."""
    torch.manual_seed(seed)
    bias = name != "Muon"
    model = nn.Sequential(nn.Linear(4, 16, bias=bias), nn.Tanh(), nn.Linear(16, 2, bias=bias))
    model = model.bfloat16().to(dtype)
    data = [(torch.randn(32, 4).bfloat16().to(dtype), torch.randn(32, 2).bfloat16().to(dtype))
            for _ in range(J + 1)]
    return model, data


def optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "LearnedOptimizer":
        net = default_net().to(next(model.parameters()).dtype)
        return gimli.LearnedOptimizer(model.parameters(), net=net, **SETTINGS[name])
    return getattr(torch.optim, name)(model.parameters(), **SETTINGS[name])


def loss_fn(m: Any, batch: Any, meta: Any = None) -> torch.Tensor:
    return F.mse_loss(m(batch[0]), batch[1])


def torch_training(name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, data = problem(name, dtype)
    opt = optimizer(name, model)
    for batch in data[:J]:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return model, opt


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.detach().double() - q.detach().double()).abs().max())
               for p, q in zip(a.parameters(), b.parameters()))


def scale(model: nn.Module) -> float:
    return max(float(p.detach().double().abs().max()) for p in model.parameters())


def assert_as_accurate_as_torch(ours: nn.Module, theirs: nn.Module, truth: nn.Module) -> None:
    """The module's tolerance: E = torch.optim's own bfloat16 error against float64."""
    error, floor = max_diff(theirs, truth), U * scale(truth)
    assert max_diff(ours, truth) <= 2 * error + floor, (max_diff(ours, truth), error)
    assert max_diff(ours, theirs) <= 3 * error + floor, (max_diff(ours, theirs), error)


TRAINED = ["SGD", "Adam", "AdamW", "RMSprop", "NAdam", "Adafactor"]


@pytest.mark.parametrize("name", TRAINED)
def test_bfloat16_unroll_trains_as_torch(name: str) -> None:
    """J steps of the unroll (committed) against torch.optim's own bfloat16 training and the
    float64 one (the module's tolerance), and the hypergradient finite and within 10 % of
    the float64 one."""
    truth, _ = torch_training(name, torch.float64)
    theirs, their_opt = torch_training(name, torch.bfloat16)
    model, data = problem(name, torch.bfloat16)
    opt = optimizer(name, model)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    assert meta.hyper("lr").dtype == torch.float32
    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    got = solver.hypergradient(data[:J], data[J], commit=True)["hypers.lr"]

    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert_as_accurate_as_torch(model, theirs, truth)
    for p, q in zip(model.parameters(), theirs.parameters()):       # the state torch keeps
        for key, value in their_opt.state[q].items():
            assert opt.state[p][key].dtype == value.dtype, (key, opt.state[p][key].dtype, value.dtype)

    model64, data64 = problem(name, torch.float64)
    opt64 = optimizer(name, model64)
    exact = gimli.GimliSolver(model64, loss_fn, opt64, gimli.MetaParams(opt64, {"lr": "scalar"})) \
        .hypergradient(data64[:J], data64[J])["hypers.lr"]
    assert math.isfinite(float(got)) and abs(float(got) - float(exact)) <= 0.1 * abs(float(exact)), \
        (float(got), float(exact))


@pytest.mark.parametrize("name", ["Adam", "NAdam", "RMSprop"])
def test_bfloat16_meta_training(name: str) -> None:
    """Online meta-training of a bfloat16 model (commit=True): every meta-step goes through,
    the model stays bfloat16 and finite, and the learned values written back are the
    float32 values learned (β₂ stays below 1)."""
    model, data = problem(name, torch.bfloat16)
    opt = optimizer(name, model)
    learn = {"lr": "scalar", "beta2": "scalar"} if name != "RMSprop" else {"lr": "scalar", "alpha": "scalar"}
    meta = gimli.MetaParams(opt, learn)
    solver = gimli.GimliSolver(model, loss_fn, opt, meta, steps=4,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-4))
    for k in range(3):
        result = solver.step(data[k:k + 4], data[J], commit=True)
        assert not result.skipped and math.isfinite(result.val_loss)
    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in model.parameters())
    second = "beta2" if name != "RMSprop" else "alpha"
    written = opt.param_groups[0]["betas"][1] if second == "beta2" else opt.param_groups[0]["alpha"]
    assert written == meta.hyper(second).item() and written < 1.0
    assert meta.hyper(second).dtype == torch.float32


CASES = [(name, per) for name in SETTINGS for per in ("scalar", "group", "tensor", "element")
         if any(per in offered for offered in capabilities()[name].values())]


@pytest.mark.parametrize("name,per", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_every_optimizer_and_granularity_in_bfloat16(name: str, per: str) -> None:
    """Every hyperparameter offered at this granularity learned at once on a bfloat16 model:
    the hypergradient is finite, the unroll's parameters stay bfloat16 (a float32
    hyperparameter per element must not promote them) and as accurate as torch.optim's own
    bfloat16 training (the module's tolerance), and a commit leaves the state in the dtypes
    torch.optim keeps."""
    truth, _ = torch_training(name, torch.float64)
    theirs, their_opt = torch_training(name, torch.bfloat16)
    model, data = problem(name, torch.bfloat16)
    opt = optimizer(name, model)
    hypers = {h: per for h, offered in capabilities()[name].items() if per in offered}
    meta = gimli.MetaParams(opt, hypers)
    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    commit = not (per == "element" and name in ("NAdam", "ASGD"))      # (refused: test_commit_torch)
    grads = solver.hypergradient(data[:J], data[J], commit=commit)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    if not commit:
        return
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_as_accurate_as_torch(model, theirs, truth)
    for p, q in zip(model.parameters(), theirs.parameters()):
        for key, value in their_opt.state[q].items():
            if isinstance(value, torch.Tensor):
                assert opt.state[p][key].dtype == value.dtype, (key, opt.state[p][key].dtype, value.dtype)


def test_hyperparameters_of_reduced_precision_models_are_float32() -> None:
    """The meta-parameters and the constant hyperparameters the unroll uses are float32 for
    bfloat16 and float16 models (and the parameters' own dtype for float32 and float64);
    a hyperparameter meta-parameter converted to bfloat16 is refused, saying why; a loss
    meta-parameter may be float32 or the model's dtype."""
    for dtype, wide in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        model = nn.Linear(3, 2).to(dtype)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
        meta = gimli.MetaParams(opt, {"beta1": "group"}, loss={"c": torch.tensor(0.1, dtype=wide)})
        solver = gimli.GimliSolver(model, lambda m, b, meta: loss_fn(m, b) * meta["c"], opt, meta)
        assert meta.hyper("beta1").dtype == wide
        constants = solver.problem.hypers(differentiable=False)
        assert all(v.dtype == wide for v in constants["beta2"])
        assert all(v.item() < 1.0 for v in constants["beta2"])
        assert constants["beta2"][0].item() == torch.tensor(0.999, dtype=wide).item()
    model = nn.Linear(3, 2).bfloat16()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = gimli.MetaParams(opt, {"beta2": "scalar"})
    meta.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"hypers.beta2 is torch.bfloat16.*kept in torch.float32"):
        gimli.GimliSolver(model, lambda m, b, meta: loss_fn(m, b), opt, meta)


def test_bfloat16_hyperparameters_would_break_adam() -> None:
    """Why: torch.optim.Adam with β₂ = 0.999 trains a bfloat16 model, and the same Adam
    with β₂ rounded as bfloat16 rounds it (to 1.0) has bias correction 1 − β₂ᵗ = 0."""
    assert torch.tensor(0.999, dtype=torch.bfloat16).item() == 1.0
    model, _ = torch_training("Adam", torch.bfloat16)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model, data = problem("Adam", torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.param_groups[0]["betas"] = (0.9, torch.tensor(0.999, dtype=torch.bfloat16).item())
    opt.zero_grad()
    loss_fn(model, data[0]).backward()
    opt.step()
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
