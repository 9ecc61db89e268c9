"""A meta-step is all or nothing: when anything fails, or a result is not finite,
GimliSolver.step raises (or, with on_nonfinite="skip", warns and skips) and every
piece of state is bit-identical to before the call. Oracle: a snapshot of every
tensor and number reachable from the model, the optimizers and the meta-parameters."""

from __future__ import annotations

import dataclasses

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from gimli.optim import adam
from strategies import regression_batches
from test_solver import assert_same, snapshot


def setup(init: bool = True) -> tuple[gimli.GimliSolver, list[Any], Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.BatchNorm1d(6), nn.Linear(6, 1)).double()
    opt = torch.optim.Adam([{"params": model[0].parameters()},
                            {"params": list(model[2].parameters()) + list(model[3].parameters()),
                             "lr": 0.02}], lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    meta = gimli.MetaParams(opt, {"lr": "group", "beta1": "scalar"},
                            loss={"l2": torch.tensor(0.01, dtype=torch.float64)},
                            init=model if init else None)

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y) + meta["l2"] * sum((p ** 2).sum() for p in m.parameters())

    solver = gimli.GimliSolver(model, loss_fn, opt, meta, scheduler=scheduler,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-3))
    batches = regression_batches(1, 3, 1, 5, size=8)
    solver.step(batches[:4], batches[4])        # the meta-optimizer now holds state
    opt.zero_grad()
    loss_fn(gimli.FunctionalModel(model, dict(model.named_parameters()), dict(model.named_buffers())),
            batches[0], meta).backward()        # the user's own training: grads and optimizer state
    opt.step()
    scheduler.step()
    return solver, batches[:4], batches[4]


def everything(solver: gimli.GimliSolver) -> list[Any]:
    problem = solver.problem
    out = snapshot(problem.module, problem.inner.torch_optimizer, solver.meta, solver.meta_opt)
    out.append(("scheduler", repr(problem.scheduler.state_dict())))
    return out


@pytest.mark.parametrize("init", [True, False])
def test_nan_in_the_middle_of_the_unroll_changes_nothing(init: bool) -> None:
    solver, train, val = setup(init)
    before = everything(solver)
    x, y = train[2]
    poisoned = train[:2] + [(x, y * float("nan"))] + train[3:]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        solver.step(poisoned, val)
    assert_same(before, everything(solver))
    solver.step(train, val)                     # and the solver goes on
    assert any(torch.is_tensor(v) and not torch.equal(v, w)
               for (_, v), (_, w) in zip(before, everything(solver)))


def poison_lr_cotangent(monkeypatch: pytest.MonkeyPatch, solver: gimli.GimliSolver) -> None:
    """Adam's VJP returns a NaN lr cotangent: the losses are finite, the hypergradient not."""
    original = adam.vjp

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if "lr" in out.hypers:
            out.hypers["lr"] = out.hypers["lr"] * float("nan")
        return out

    monkeypatch.setattr(solver.problem.inner, "rule", dataclasses.replace(adam.RULE, vjp=poisoned))


def test_nonfinite_hypergradient_raises_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    solver, train, val = setup()
    poison_lr_cotangent(monkeypatch, solver)
    before = everything(solver)
    with pytest.raises(FloatingPointError, match="hypers.lr.*nothing was changed"):
        solver.step(train, val)
    assert_same(before, everything(solver))


def test_nonfinite_hypergradient_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    solver, train, val = setup()
    poison_lr_cotangent(monkeypatch, solver)
    before = everything(solver)
    with pytest.warns(RuntimeWarning, match="skipped.*hypers.lr"):
        result = solver.step(train, val, on_nonfinite="skip")
    assert result.skipped and result.val_loss == result.val_loss
    assert_same(before, everything(solver))


def test_meta_update_overflowing_is_undone() -> None:
    solver, train, val = setup()
    assert solver.meta_opt is not None
    solver.meta_opt = torch.optim.SGD(solver.meta.parameters(), lr=1e308)  # φ − lr·g overflows
    before = everything(solver)
    with pytest.raises(FloatingPointError, match=r"after the meta-update"):
        solver.step(train, val)
    assert_same(before, everything(solver))


class Interrupted(Exception):
    pass


class BreaksMidway(torch.optim.SGD):
    """A meta-optimizer that updates the first parameter, then fails."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        with torch.no_grad():
            first = self.param_groups[0]["params"][0]
            first.add_(1.0)
        self.state[first]["momentum_buffer"] = torch.ones_like(first)
        raise Interrupted


def test_failure_inside_the_meta_optimizer_is_undone() -> None:
    solver, train, val = setup()
    solver.meta_opt = BreaksMidway(solver.meta.parameters(), lr=0.1, momentum=0.9)
    before = everything(solver)
    with pytest.raises(Interrupted):
        solver.step(train, val)
    assert_same(before, everything(solver))


def test_bad_on_nonfinite() -> None:
    solver, train, val = setup()
    with pytest.raises(ValueError, match="on_nonfinite"):
        solver.step(train, val, on_nonfinite="ignore")


# --- commit: the unroll's end written into the user's objects ------------------------------
@pytest.mark.parametrize("cls,kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
                                        (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01))])
def test_commit_equals_training_with_torch_optim(cls: type, kwargs: dict[str, Any]) -> None:
    """Oracle: the same J steps taken by the real torch.optim optimizer and scheduler on a
    copy; then one more real step from each must agree too (the written state is usable)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    opt = cls(model.parameters(), **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})

    def loss_fn(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y) + 0.01 * sum((p ** 2).sum() for p in m.parameters())

    batches = regression_batches(1, 3, 1, 6, size=8)
    twin_model = copy.deepcopy(model)
    twin_opt = cls(twin_model.parameters(), **kwargs)
    twin_scheduler = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=2, gamma=0.5)
    solver = gimli.GimliSolver(model, loss_fn, opt, meta, scheduler=scheduler)
    solver.hypergradient(batches[:4], batches[4], commit=True)

    def real_step(m: nn.Module, o: torch.optim.Optimizer, batch: Any) -> None:
        o.zero_grad()
        loss_fn(m, batch, meta).backward()
        o.step()

    for batch in batches[:4]:
        real_step(twin_model, twin_opt, batch)
        twin_scheduler.step()
    for _ in range(2):
        for (name, ours), theirs in zip(model.state_dict().items(), twin_model.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14, msg=name)
        for p, q in zip(opt.param_groups[0]["params"], twin_opt.param_groups[0]["params"]):
            assert opt.state[p].keys() == twin_opt.state[q].keys()
            for key in opt.state[p]:
                torch.testing.assert_close(opt.state[p][key], twin_opt.state[q][key], rtol=1e-12,
                                           atol=1e-14, msg=key)
        assert scheduler.state_dict() == twin_scheduler.state_dict()
        assert opt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"]
        real_step(model, opt, batches[5])           # both go on with torch.optim
        real_step(twin_model, twin_opt, batches[5])


def test_commit_refused_for_maml_and_undone_on_failure() -> None:
    solver, train, val = setup(init=True)
    with pytest.raises(ValueError, match="θ₀"):
        solver.step(train, val, commit=True)
    solver, train, val = setup(init=False)
    before = everything(solver)
    x, y = train[3]
    with pytest.raises(FloatingPointError):
        solver.step(train[:3] + [(x * float("inf"), y)], val, commit=True)
    assert_same(before, everything(solver))
    solver.step(train, val, commit=True)
    weights = [p for n, p in solver.problem.module.named_parameters()]
    assert all(not torch.equal(p, q) for p, q in zip(weights, [v for n, v in before if n.endswith("weight")]))


# --- persistence --------------------------------------------------------------------------
def resumable(seed: int) -> tuple[gimli.GimliSolver, nn.Module, torch.optim.Optimizer]:
    """Online learning of lrs and an L2 coefficient with the solver drawing its own
    batches (a pass of 5 training batches for J = 2: the position matters)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                          lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    meta = gimli.MetaParams(opt, {"lr": "group", "momentum": "scalar"},
                            loss={"l2": torch.tensor(0.01, dtype=torch.float64)})
    data = regression_batches(1, 3, 1, 8, size=8)

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y) + meta["l2"] * sum((p ** 2).sum() for p in m.parameters())

    solver = gimli.GimliSolver(model, loss_fn, opt, meta, scheduler=scheduler, steps=2,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2),
                               train_data=data[:5], val_data=data[5:])
    return solver, model, opt


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one() -> None:
    import io

    solver, model, opt = resumable(0)
    for _ in range(3):
        solver.step(commit=True)
    buffer = io.BytesIO()
    torch.save({"solver": solver.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()},
               buffer)
    went_on = [solver.step(commit=True) for _ in range(4)]
    after = everything(solver)

    resumed, model2, opt2 = resumable(1)        # other initial weights: everything must come back
    buffer.seek(0)
    saved = torch.load(buffer)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["solver"])
    assert resumed.meta_steps == 3
    again = [resumed.step(commit=True) for _ in range(4)]
    assert again == went_on                     # losses and hypergradient norms, exactly
    assert_same(after, everything(resumed))


def test_load_state_dict_checks_what_it_is_given() -> None:
    solver, _, _ = resumable(0)
    state = solver.state_dict()
    state["param_groups"] = state["param_groups"][:1]
    with pytest.raises(ValueError, match="param groups"):
        solver.load_state_dict(state)


# --- no growth ----------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_thousand_steps_do_not_grow_memory() -> None:
    """1,000 meta-steps (with commits, so the optimizer state is rewritten each time) hold
    no more memory than the first 100 did: growth below 10 MB. Holding on to each step's
    Unroll object, a leak this test is meant to see, measured 25 KB per step here: 22 MB
    over the 900 steps."""
    import gc

    solver, _, _ = resumable(0)
    for _ in range(100):
        solver.step(commit=True)
    gc.collect()
    before = rss_mb()
    for _ in range(900):
        solver.step(commit=True)
    gc.collect()
    assert rss_mb() - before < 10.0


# --- non-finite values: skipped or raised, and named where they arise -----------------------------
@pytest.mark.parametrize("where", ["unroll", "validation"])
def test_nonfinite_loss_is_skipped(where: str) -> None:
    solver, train, val = setup()
    before = everything(solver)
    x, y = (train[2] if where == "unroll" else val)
    bad = (x, y * float("nan"))
    args = (train[:2] + [bad] + train[3:], val) if where == "unroll" else (train, bad)
    with pytest.warns(RuntimeWarning, match="skipped.*non-finite loss"):
        result = solver.step(*args, on_nonfinite="skip")
    assert result.skipped
    assert_same(before, everything(solver))
    with pytest.raises(FloatingPointError, match="non-finite loss.*nothing was changed"):
        solver.step(*args)
    assert_same(before, everything(solver))


def test_nonfinite_gradient_with_a_finite_loss_is_named_at_its_step() -> None:
    """√|b| at b = 0 is finite, its gradient is not: the error names step 2 and the
    tensor, and does not blame the optimizer's hyperparameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[2].bias.zero_()
    opt = torch.optim.Adam(model[0].parameters(), lr=0.01)      # the bias stays 0
    meta = gimli.MetaParams(opt, ["lr"])

    def loss_fn(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        x, y, kink = batch
        penalty = m[2].bias.abs().sqrt().sum() + (m[0].bias * 0).abs().sqrt().sum() if kink else 0.0
        return F.mse_loss(m(x), y) + penalty

    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 3, generator=g, dtype=torch.float64),
              torch.randn(8, 1, generator=g, dtype=torch.float64), j == 2) for j in range(4)]
    solver = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=lambda m, b, meta: F.mse_loss(m(b[0]), b[1]),
                               meta_opt=torch.optim.SGD(meta.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match=r"G_2 .* step 2 .*not finite in 0\.bias.*backward") as error:
        solver.step(train, train[0][:2])
    assert "hyperparameters" not in str(error.value)
    with pytest.warns(RuntimeWarning, match="skipped.*G_2"):
        assert solver.step(train, train[0][:2], on_nonfinite="skip").skipped


# --- the meta-optimizer must hold exactly the meta-parameters -----------------------------------
def test_meta_optimizer_over_the_wrong_tensors() -> None:
    solver, train, val = setup(init=False)
    model = solver.problem.module
    before = everything(solver)
    solver.meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)        # the model's, not φ
    with pytest.raises(ValueError, match="not meta-parameters"):
        solver.step(train, val)
    some = [p for n, p in solver.meta.named_parameters() if n != "loss.l2"]
    solver.meta_opt = torch.optim.Adam(some, lr=1e-3)
    with pytest.raises(ValueError, match="does not hold the meta-parameter.*loss.l2"):
        solver.step(train, val)
    def mine(state: list[Any]) -> list[Any]:           # all but the meta-optimizer, swapped above
        return [(n, v) for n, v in state if not n.startswith("3.")]

    assert_same(mine(before), mine(everything(solver)))
    with pytest.raises(TypeError, match="meta_opt must be a torch.optim optimizer.*not str"):
        gimli.GimliSolver(model, solver.problem.loss_fn, solver.problem.inner.torch_optimizer,
                          solver.meta, meta_opt="adam")  # type: ignore[arg-type]


# --- a learned optimizer keeps its network; checkpoints load with weights_only ---------------------
def learned_setup() -> tuple[gimli.GimliSolver, list[Any], Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    opt = gimli.LearnedOptimizer(model.parameters(), net=gimli.optim.learned.default_net().double(), lr=0.05)
    meta = gimli.MetaParams(opt, {"net": "scalar", "lr": "scalar"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-3))
    batches = regression_batches(1, 3, 1, 5, size=8)
    return solver, batches[:4], batches[4]


def test_learned_optimizer_keeps_its_network() -> None:
    import io

    solver, train, val = learned_setup()
    opt = solver.problem.inner.torch_optimizer
    net = solver.meta.hypers.net
    assert opt.param_groups[0]["net"] is net
    solver.step(train, val)
    x, y = train[1]
    with pytest.raises(FloatingPointError):
        solver.step([train[0], (x, y * float("inf"))], val)             # a failed step
    assert opt.param_groups[0]["net"] is net
    buffer = io.BytesIO()
    torch.save(solver.state_dict(), buffer)
    solver.step(train, val)
    buffer.seek(0)
    solver.load_state_dict(torch.load(buffer, weights_only=True))       # a resume
    assert opt.param_groups[0]["net"] is net
    # the user's own training steps with the learned network, as gimli's unroll does
    twin, hg = copy.deepcopy(solver), None
    before = [p.detach().clone() for p in solver.problem.module.parameters()]
    solver.hypergradient(train[:1], val, commit=True)
    opt2 = twin.problem.inner.torch_optimizer
    opt2.zero_grad()
    F.mse_loss(twin.problem.module(train[0][0]), train[0][1]).backward()
    opt2.step()
    for p, q, b in zip(solver.problem.module.parameters(), twin.problem.module.parameters(), before):
        assert not torch.equal(p, b)
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    del hg


@pytest.mark.parametrize("kind", ["learned", "scheduler", "loss-module", "data"])
def test_every_checkpoint_loads_with_weights_only(kind: str) -> None:
    import io

    if kind == "learned":
        solver, train, val = learned_setup()
        solver.step(train, val)
    elif kind == "scheduler":
        solver, train, val = setup()
        solver.step(train, val)
    elif kind == "data":
        solver, _, _ = resumable(0)
        solver.step(commit=True)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        weigher = nn.Sequential(nn.Linear(1, 4), nn.Softplus(), nn.Linear(4, 1)).double()
        meta = gimli.MetaParams(opt, ["lr"], loss={"weigher": weigher})

        def loss_fn(m: Any, b: Any, meta: Any) -> torch.Tensor:
            r = (m(b[0]) - b[1]) ** 2
            return (meta["weigher"](r) * r).mean()

        solver = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=lambda m, b, meta: F.mse_loss(m(b[0]), b[1]),
                                   meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-3))
        train, val = setup()[1:]
        solver.step(train, val)
    buffer = io.BytesIO()
    torch.save(solver.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    solver.load_state_dict(state)


# --- load_state_dict checks everything first --------------------------------------------------------
@pytest.mark.parametrize("damage,entry", [
    (lambda s: s.pop("data"), "'data'"),
    (lambda s: s["meta"].pop("hypers.lr"), r"state_dict\['meta'\]"),
    (lambda s: s["meta"].__setitem__("hypers.lr", torch.zeros(3)), r"state_dict\['meta'\]\['hypers.lr'\]"),
    (lambda s: s.__setitem__("meta_opt", None), r"state_dict\['meta_opt'\]"),
    (lambda s: s.__setitem__("meta_steps", "3"), r"state_dict\['meta_steps'\]"),
    (lambda s: s["data"].__setitem__("train", {"epoch": 0}), r"state_dict\['data'\]\['train'\]"),
    (lambda s: s["data"].__setitem__("train", {"epoch": 0, "index": 99}), "fewer than the saved position"),
    (lambda s: s.__setitem__("scheduler", None), r"state_dict\['scheduler'\]"),
])
def test_load_state_dict_is_all_or_nothing(damage: Any, entry: str) -> None:
    solver, _, _ = resumable(0)
    solver.step(commit=True)
    state = copy.deepcopy(solver.state_dict())
    state["param_groups"][0]["lr"] = 123.0              # would be loaded first if not checked
    state["meta"]["hypers.momentum"] = torch.tensor(0.5, dtype=torch.float64)
    damage(state)
    before = everything(solver)
    position = solver.state_dict()["data"]
    with pytest.raises(ValueError, match=entry):
        solver.load_state_dict(state)
    assert_same(before, everything(solver))
    assert solver.state_dict()["data"] == position


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.Adam, dict(lr=0.01)),
                                        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3))])
def test_commit_keeps_the_state_of_a_tensor_whose_gradient_was_zero(cls: type, kwargs: dict[str, Any]) -> None:
    """A head weighted 0 during the unroll has a zero gradient (not None): torch.optim
    steps it and keeps its state (Adam's step count, SGD's momentum buffer), and so
    must a commit, or training diverges from the user's own loop once the weight is on.
    Oracle: the real optimizer over the same steps, then four more with the weight on."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(3, 4), "head": nn.Linear(4, 1), "aux": nn.Linear(4, 1)}).double()

    def loss(m: Any, batch: Any, weight: float) -> torch.Tensor:
        h = torch.tanh(m["body"](batch[0]))
        return F.mse_loss(m["head"](h), batch[1]) + weight * F.mse_loss(m["aux"](h), batch[1])

    data = regression_batches(1, 3, 1, 8, size=8)
    twin = copy.deepcopy(model)
    twin_opt = cls(twin.parameters(), **kwargs)
    opt = cls(model.parameters(), **kwargs)
    solver = gimli.GimliSolver(model, lambda m, b, meta: loss(m, b, 0.0), opt, gimli.MetaParams(opt, ["lr"]))
    solver.hypergradient(data[:3], data[3], commit=True)
    for m, o, weight, batches in ((twin, twin_opt, 0.0, data[:3]), (twin, twin_opt, 1.0, data[4:]),
                                  (model, opt, 1.0, data[4:])):
        for batch in batches:
            o.zero_grad()
            loss(m, batch, weight).backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


def test_a_retried_step_equals_an_uninterrupted_one() -> None:
    """A step that fails (here in the validation loss, after the unroll drew its dropout
    masks) leaves torch's random state as it was: retried, it equals the step of a run
    that never failed, dropout masks included."""
    def make() -> tuple[gimli.GimliSolver, list[Any], Any]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1)).double()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        meta = gimli.MetaParams(opt, {"lr": "tensor"}, init=model)
        solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta,
                                   meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-3))
        data = regression_batches(1, 3, 1, 4, size=8)
        return solver, data[:3], data[3]

    clean, train, val = make()
    torch.manual_seed(5)
    expected = [clean.step(train, val) for _ in range(2)]
    faulty, train, val = make()
    torch.manual_seed(5)

    def broken(m: Any, b: Any) -> torch.Tensor:
        raise RuntimeError("transient")

    faulty.problem.val_loss_fn, original = (lambda m, b, meta: broken(m, b)), faulty.problem.val_loss_fn
    with pytest.raises(RuntimeError, match="transient"):
        faulty.step(train, val)
    faulty.problem.val_loss_fn = original
    assert [faulty.step(train, val) for _ in range(2)] == expected


def test_learned_optimizer_checkpoint_keeps_its_network() -> None:
    """The guide's resume recipe (docs/guide/long-runs.md) with a LearnedOptimizer: its own state_dict loads with
    weights_only=True, and loading it keeps the network gimli meta-learns in place."""
    import io

    solver, train, val = learned_setup()
    opt = solver.problem.inner.torch_optimizer
    net = solver.meta.hypers.net
    solver.step(train, val)
    buffer = io.BytesIO()
    torch.save({"solver": solver.state_dict(), "opt": opt.state_dict(),
                "model": solver.problem.module.state_dict()}, buffer)
    went_on = [solver.step(train, val) for _ in range(2)]
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, _, _ = learned_setup()
    fresh_opt, fresh_net = fresh.problem.inner.torch_optimizer, fresh.meta.hypers.net
    fresh.problem.module.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    fresh.load_state_dict(saved["solver"])
    assert fresh_opt.param_groups[0]["net"] is fresh_net
    assert [fresh.step(train, val) for _ in range(2)] == went_on
    assert all(torch.equal(p, q) for p, q in zip(fresh_net.parameters(), net.parameters()))
