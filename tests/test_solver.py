"""GimliSolver's contract: hypergradient() changes nothing, step() applies the
meta-optimizer and writes hyperparameters back, batches from iterables, model
parts (BatchNorm buffers, frozen and unused parameters), and clear errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import gimli
from strategies import mlp, mse, regression_batches, take_real_steps, Problem
from test_sweep import assert_hypergradients_close


def snapshot(*objs: Any) -> list[tuple[str, torch.Tensor | Any]]:
    """Every tensor and number reachable from modules and optimizers, copied."""
    out: list[tuple[str, Any]] = []
    for k, obj in enumerate(objs):
        if isinstance(obj, nn.Module):
            out += [(f"{k}.{n}", t.detach().clone()) for n, t in obj.state_dict().items()]
            out += [(f"{k}.{n}.grad", None if p.grad is None else p.grad.clone())
                    for n, p in obj.named_parameters()]
        else:
            out.append((f"{k}.state_dict", copy.deepcopy(obj.state_dict())))
    return out


def assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for (na, va), (nb, vb) in zip(a, b):
        assert na == nb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), na
        elif isinstance(va, dict):
            assert repr(va) == repr(vb), na     # optimizer state_dicts: tensors print in full
        else:
            assert va == vb, na


def small(cls: type = torch.optim.Adam, **kw: Any) -> Problem:
    torch.manual_seed(0)
    model = mlp([2, 5, 1], "tanh")
    params = list(model.parameters())
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.05, **kw)
    batches = regression_batches(0, 2, 1, 5)
    problem = Problem(model, opt, batches[:4], batches[4])
    take_real_steps(problem, 2)                 # start from a stepped optimizer
    return problem


def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
    return mse(m, batch) + meta["l2"] * sum((p ** 2).sum() for p in m.parameters())


def make(problem: Problem, hypers: Any = {"lr": "group"}, **kw: Any) -> tuple[gimli.GimliSolver, gimli.MetaParams]:
    meta = gimli.MetaParams(problem.opt, hypers, loss={"l2": torch.tensor(0.01, dtype=torch.float64)},
                            init=problem.model)
    return gimli.GimliSolver(problem.model, loss_fn, problem.opt, meta, val_loss_fn=mse, **kw), meta


def test_hypergradient_changes_nothing() -> None:
    torch.set_printoptions(precision=17)
    p = small(torch.optim.Adam, amsgrad=True)
    solver, meta = make(p, {"lr": "group", "beta1": "scalar"})
    before = snapshot(p.model, p.opt, meta)
    groups = repr(p.opt.param_groups)
    hg = solver.hypergradient(p.train, p.val)
    assert set(hg) == {n for n, _ in meta.named_parameters()}
    assert_same(snapshot(p.model, p.opt, meta), before)
    assert repr(p.opt.param_groups) == groups
    torch.set_printoptions(profile="default")


def test_step_applies_meta_optimizer_and_writes_back() -> None:
    p = small(torch.optim.SGD, momentum=0.9)
    meta_lr = 1e-3
    solver, meta = make(p, {"lr": "group", "momentum": "scalar"})
    meta_opt = torch.optim.SGD(meta.parameters(), lr=meta_lr)
    solver.meta_opt = meta_opt
    before = {n: q.detach().clone() for n, q in meta.named_parameters()}
    hg = solver.hypergradient(p.train, p.val)
    result = solver.step(p.train, p.val)
    for n, q in meta.named_parameters():        # line 16 with plain SGD: φ ← φ − η∇φ
        torch.testing.assert_close(q.detach(), before[n] - meta_lr * hg[n], rtol=1e-15, atol=1e-15)
    lrs = meta.hyper("lr").detach()
    assert [g["lr"] for g in p.opt.param_groups] == [lrs[0].item(), lrs[1].item()]
    assert all(g["momentum"] == meta.hyper("momentum").item() for g in p.opt.param_groups)
    assert len(result.train_losses) == 4 and result.val_loss > 0
    assert result.hypergradient_norms["hypers.lr"] == pytest.approx(hg["hypers.lr"].norm().item())
    # hypergradient() reports the same losses as the step over the same unroll
    assert isinstance(hg, dict) and isinstance(hg, gimli.Hypergradients)
    assert hg.val_loss == result.val_loss and hg.train_losses == result.train_losses


def test_betas_write_back_as_a_tuple() -> None:
    p = small(torch.optim.Adam)
    solver, meta = make(p, {"beta2": "group"}, meta_opt=None)
    solver.meta_opt = torch.optim.SGD(meta.parameters(), lr=1e-2)
    solver.step(p.train, p.val)
    for g, group in enumerate(p.opt.param_groups):
        assert group["betas"] == (0.9, meta.hyper("beta2")[g].item())


def test_batches_from_iterables() -> None:
    p = small()
    solver, _ = make(p, train_data=p.train, val_data=[p.val], steps=3)
    first = solver.hypergradient()              # draws train[0:3]
    second = solver.hypergradient()             # draws train[3], then starts over: train[0:2]
    ref1 = make(p)[0].hypergradient(p.train[:3], p.val)
    ref2 = make(p)[0].hypergradient([p.train[3]] + p.train[:2], p.val)
    assert_hypergradients_close(first, ref1, rtol=0)
    assert_hypergradients_close(second, ref2, rtol=0)


def test_batchnorm_buffers_untouched_and_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    batches = regression_batches(0, 2, 1, 4)
    meta = gimli.MetaParams(opt, {"lr": "tensor"}, init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    got = solver.hypergradient(batches[:3], batches[3])
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, batches[:3], batches[3]))


def test_frozen_and_unused_parameters() -> None:
    """A model parameter outside the optimizer is held fixed (and, with init=, is
    learned like φ^loss); an optimizer tensor the loss never reads does not step."""
    torch.manual_seed(0)
    model = mlp([2, 3, 1], "softplus")
    model.register_parameter("unused", nn.Parameter(torch.ones(2, dtype=torch.float64)))
    opt = torch.optim.Adam([model[0].weight, model[0].bias, model[2].weight, model.unused],
                           lr=0.05, weight_decay=0.1)
    batches = regression_batches(1, 2, 1, 4)
    meta = gimli.MetaParams(opt, {"lr": "tensor", "weight_decay": "element"}, init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    got = solver.hypergradient(batches[:3], batches[3])
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, batches[:3], batches[3]))
    assert got["init.2.bias"].abs().sum() > 0           # frozen, learned through every G_j
    assert torch.all(got["init.unused"] == 0) and torch.all(got["hypers.lr"][3] == 0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_buffers_created_at_different_steps(nesterov: bool) -> None:
    """A tensor that the loss reads only from some step on gets its SGD momentum
    buffer later than the rest of its group: the step equals torch.optim's and the
    hypergradient the autograd unroll's."""
    torch.manual_seed(0)
    model = mlp([2, 3, 1], "tanh")
    model.register_parameter("extra", nn.Parameter(torch.ones(2, dtype=torch.float64)))
    dampening = {} if nesterov else {"dampening": 0.1}       # Nesterov needs dampening 0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov,
                          weight_decay=0.01, **dampening)

    def loss(m: Any, batch: Any, meta: Any = None) -> torch.Tensor:
        x, y, use = batch
        extra = dict(m.named_parameters())["extra"]
        return mse(m, (x, y)) + (((extra - 2) ** 2).sum() if use else 0.0)

    batches = [(x, y, j >= 2) for j, (x, y) in enumerate(regression_batches(2, 2, 1, 5))]
    hypers = {"lr": "tensor", "momentum": "group", "weight_decay": "tensor"}
    if not nesterov:
        hypers["dampening"] = "scalar"
    meta = gimli.MetaParams(opt, hypers, init=model)
    solver = gimli.GimliSolver(model, loss, opt, meta)
    got = solver.hypergradient(batches[:4], batches[4])
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, batches[:4], batches[4]))
    assert got["init.extra"].abs().sum() > 0

    inner = gimli.optim.bind(opt)                           # forward: against torch.optim itself
    theta, state = [p.detach().clone() for p in inner.params], inner.read_state()
    hp = inner.constant_hypers()
    for batch in batches[:4]:
        view = [t.clone().requires_grad_() for t in theta]
        ours = loss(gimli.FunctionalModel(model, dict(zip([n for n, _ in model.named_parameters()],
                                                          view)), {}), batch)
        grads = list(torch.autograd.grad(ours, view, allow_unused=True))
        theta, state = inner.step(theta, state, grads, hp)
        opt.zero_grad(set_to_none=True)
        loss(model_view(model), batch).backward()
        opt.step()
    for ours_p, p in zip(theta, inner.params):
        torch.testing.assert_close(ours_p, p.detach(), rtol=1e-13, atol=1e-15)


def model_view(model: nn.Module) -> Any:
    """The model itself, seen the way loss functions see it."""
    return gimli.FunctionalModel(model, dict(model.named_parameters()), dict(model.named_buffers()))


# --- clear errors -----------------------------------------------------------------------

class MySGD(torch.optim.SGD):
    """A subclass may change the update: not differentiated unless registered."""


def test_unsupported_optimizer_is_named() -> None:
    model = mlp([2, 1], "tanh")
    opt = MySGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="MySGD.*SGD.*register_optimizer"):
        gimli.MetaParams(opt, ["lr"])
    with pytest.raises(TypeError, match="MySGD"):
        gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(init=model))


@pytest.mark.parametrize("hypers,match", [
    ({"momentum": "scalar"}, "momentum has no effect"),
    ({"betas": "scalar"}, "no differentiable hyperparameter 'betas'"),
    ({"lr": "per-row"}, "granularity"),
    ({"lr": "scalar"}, "differs between param groups"),
])
def test_bad_hyperparameter_declarations(hypers: dict[str, str], match: str) -> None:
    model = mlp([2, 2, 1], "tanh")
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match=match):
        gimli.MetaParams(opt, hypers)


@pytest.mark.parametrize("bad_loss,match", [
    (lambda m, b, meta: (m(b[0]) - b[1]) ** 2, "scalar"),
    (lambda m, b, meta: torch.tensor(1.0, dtype=torch.float64), "does not depend"),
    (lambda m, b, meta: mse(m, b) * float("inf"), "non-finite"),
    (lambda m, b, meta: "loss", "scalar tensor"),
])
def test_bad_losses(bad_loss: Any, match: str) -> None:
    p = small()
    solver = gimli.GimliSolver(p.model, bad_loss, p.opt, gimli.MetaParams(p.opt, {"lr": "group"}),
                               val_loss_fn=mse)
    with pytest.raises((ValueError, FloatingPointError), match=match):
        solver.hypergradient(p.train, p.val)


def test_bad_batches_and_setup() -> None:
    p = small()
    solver, _ = make(p, steps=4)
    with pytest.raises(ValueError, match="need 4 training batches"):
        solver.hypergradient(p.train[:2], p.val)
    with pytest.raises(ValueError, match="no validation batch"):
        solver.hypergradient(p.train)
    with pytest.raises(ValueError, match="meta-optimizer"):
        solver.step(p.train, p.val)
    stranger = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(list(p.model.parameters()) + [stranger], lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        gimli.GimliSolver(p.model, loss_fn, opt, gimli.MetaParams(init=p.model))
    with pytest.raises(ValueError, match="different optimizer"):
        gimli.GimliSolver(p.model, loss_fn, opt, gimli.MetaParams(p.opt, {"lr": "group"}))
    with pytest.raises(KeyError, match="no loss meta-parameter 'l3'"):
        gimli.MetaParams(loss={"l2": torch.zeros(1)})["l3"]


def test_default_validation_loss_reads_loss_parameters() -> None:
    """Without val_loss_fn, L^val is loss_fn itself, which reads φ^loss directly:
    that direct gradient joins A^loss (docs/design.md §2)."""
    p = small(torch.optim.SGD, momentum=0.5)
    meta = gimli.MetaParams(p.opt, {"lr": "group"}, loss={"l2": torch.tensor(0.05, dtype=torch.float64)})
    solver = gimli.GimliSolver(p.model, loss_fn, p.opt, meta)
    assert_hypergradients_close(solver.hypergradient(p.train, p.val),
                                gimli.full_unroll_hypergradient(solver, p.train, p.val))


def test_works_under_no_grad() -> None:
    p = small()
    solver, _ = make(p)
    ref = solver.hypergradient(p.train, p.val)
    with torch.no_grad():
        assert_hypergradients_close(solver.hypergradient(p.train, p.val), ref, rtol=0)
        assert_hypergradients_close(gimli.full_unroll_hypergradient(solver, p.train, p.val), ref)


@pytest.mark.parametrize("name,why", [("LBFGS", "closure"), ("SparseAdam", "sparse")])
def test_refused_optimizers_say_why(name: str, why: str) -> None:
    model = mlp([2, 1], "tanh")
    opt = getattr(torch.optim, name)(model.parameters())
    with pytest.raises(TypeError, match=f"{name}.*{why}"):
        gimli.MetaParams(opt, ["lr"])
