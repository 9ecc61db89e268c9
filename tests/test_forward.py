"""Forward mode (``GimliSolver(mode="forward")``): the tangents dθ'_j/dφ and dσ_j/dφ carried
with the unroll give the same hypergradient as reverse mode.

Oracle: reverse mode on the same solver setup, itself equal to the full autograd unroll
for every optimizer (tests/test_sweep.py, tests/test_capabilities.py); float64, the
same tolerance as those (rtol 1e-9). Forward mode is the transpose of the same linear
maps, evaluated in the other order, so the two agree to rounding, not only to 1e-9.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import gimli
from gimli._forward import directions
from gimli.optim import capabilities
from gimli.optim._settings import TYPICAL
from optim_db import IDS, OPTIM_DB, OptimRow, granularities
from setups import optimizer_class
from strategies import meta_choices, mlp, mse, problems, regression_batches, take_real_steps
from strategies import Problem as Task
from test_capabilities import PRE
from test_sweep import assert_hypergradients_close, build

pytestmark = pytest.mark.filterwarnings("ignore::gimli.GimliWarning")


def both(make: Any, train: list[Any], val: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The hypergradient of ``make(mode)``'s solver in reverse and in forward mode, each from
    the same random state (dropout draws the same masks)."""
    torch.manual_seed(7)
    reverse = make("reverse").hypergradient(train, val)
    torch.manual_seed(7)
    forward = make("forward").hypergradient(train, val)
    return reverse, forward


def penalized(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
    """mse plus a φ^loss L2 term per weight matrix (log-coefficients)."""
    weights = [p for name, p in m.named_parameters() if name.endswith("weight")]
    return mse(m, batch) + sum(c.exp() * (w ** 2).sum() for c, w in zip(meta["l2"], weights))


# every optimizer, every hyperparameter it claims, at once: per group where it may be
# (one value per param group), else one for all; and a φ^loss term; the learned
# optimizer's network (hundreds of weights: reverse mode's case) is left out
CASES = sorted(capabilities())


@pytest.mark.parametrize("opt_name", CASES)
def test_forward_equals_reverse_for_every_optimizer(opt_name: str) -> None:
    pre = PRE.get(opt_name, 2)
    steps = 16
    batches = regression_batches(3, 3, 2, pre + steps + 1)
    claims = {h: "group" if "group" in per else "scalar"
              for h, per in capabilities()[opt_name].items() if h != "net"}

    def make(mode: str) -> gimli.GimliSolver:
        torch.manual_seed(0)
        model = mlp([3, 4, 2], "tanh", bias=opt_name != "Muon")
        params = list(model.parameters())
        half = len(params) // 2
        opt = optimizer_class(opt_name)([{"params": params[:half]},
                                         {"params": params[half:], "lr": TYPICAL[opt_name]["lr"] * 0.5}],
                                        **TYPICAL[opt_name])
        take_real_steps(Task(model, opt, batches[:pre], batches[-1]), pre)
        # (φ^loss reaches θ through no step of an optimizer blind to G's size: Rprop)
        loss = {} if gimli.optim.bind(opt).rule.insensitive_to_g else \
            {"l2": torch.tensor([-4.0, -3.0], dtype=torch.float64)}
        meta = gimli.MetaParams(opt, claims, loss=loss)
        return gimli.GimliSolver(model, penalized if loss else lambda m, b, meta: mse(m, b), opt, meta,
                                 val_loss_fn=mse, mode=mode)

    reverse, forward = both(make, batches[pre:pre + steps], batches[-1])
    assert {f"hypers.{h}" for h in claims} <= set(reverse)
    assert all(g.abs().sum() > 0 for g in reverse.values())
    assert_hypergradients_close(forward, reverse)


def _fit(solver_for: Any, choice: dict[str, Any], steps: int, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``choice`` made forward mode's: no θ₀, nothing per element, and at most ``steps``
    tangent directions (φ^loss dropped, then granularities coarsened, then hyperparameters
    dropped, in that order), so that every draw is used."""
    choice = dict(choice, init=False, hypers=dict(choice["hypers"]))
    for name, per in choice["hypers"].items():
        if per == "element":
            choice["hypers"][name] = "tensor" if "tensor" in granularities(opt, name) else "scalar"
    coarser = {"tensor": "group", "group": "scalar"}
    while True:
        solver = solver_for(choice)
        count = len(directions(solver.meta, frozenset(solver.meta.granularity), solver.problem.loss_leaves()))
        if count <= steps:
            return choice
        groups_agree = len({group["lr"] for group in opt.param_groups}) == 1
        finer = [n for n, per in choice["hypers"].items() if per in coarser
                 and coarser[per] in granularities(opt, n)
                 and (n != "lr" or groups_agree or coarser[per] != "scalar")]
        if choice["loss"]:
            choice["loss"] = False
        elif finer:
            choice["hypers"][finer[0]] = coarser[choice["hypers"][finer[0]]]
        else:
            choice["hypers"].pop(next(iter(choice["hypers"])))


@pytest.mark.parametrize("row", OPTIM_DB, ids=IDS)
@given(data=st.data())
def test_forward_equals_reverse_property(row: OptimRow, data: st.DataObject) -> None:
    problem, kwargs, steps = data.draw(problems(row, max_steps=10))
    first_order = data.draw(st.booleans())
    truncate = data.draw(st.one_of(st.none(), st.integers(1, steps)))
    choice = data.draw(meta_choices(row, kwargs, problem.opt))
    saved = (copy.deepcopy(problem.model.state_dict()), copy.deepcopy(problem.opt.state_dict()))

    def solver_for(choice: dict[str, Any], mode: str = "reverse") -> gimli.GimliSolver:
        problem.model.load_state_dict(saved[0])
        problem.opt.load_state_dict(saved[1])
        solver = build(problem, choice, kwargs.get("maximize", False))
        return gimli.GimliSolver(problem.model, solver.problem.loss_fn, problem.opt, solver.meta,
                                 val_loss_fn=mse, first_order=first_order, truncate=truncate, mode=mode)

    swept = steps if truncate is None else min(steps, truncate)
    choice = _fit(solver_for, choice, swept, problem.opt)
    assume(choice["hypers"] or choice["loss"])
    try:
        reverse = solver_for(choice).hypergradient(problem.train, problem.val)
    except FloatingPointError:                  # a diverging unroll: nothing to compare
        assume(False)
    forward = solver_for(choice, "forward").hypergradient(problem.train, problem.val)
    assert_hypergradients_close(forward, reverse)


class Net(nn.Module):
    """BatchNorm (running statistics updated by every step) and dropout (a random mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                                  nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_forward_with_batchnorm_dropout_scheduler_and_weight_decay_loss() -> None:
    batches = regression_batches(5, 3, 2, 13, size=8)
    torch.manual_seed(0)
    net = Net().double()

    def make(mode: str) -> gimli.GimliSolver:
        model = copy.deepcopy(net)
        opt = torch.optim.SGD([{"params": model.body[0].parameters()},
                               {"params": list(model.body[1].parameters()) + list(model.body[4].parameters())}],
                              lr=0.1, momentum=0.9)
        first = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        then = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        scheduler = torch.optim.lr_scheduler.ChainedScheduler([first, then])
        meta = gimli.MetaParams(opt, {"lr": "group", "momentum": "scalar"},
                                loss={"l2": torch.tensor([-3.0, -4.0], dtype=torch.float64)})

        def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(m(x), y) + meta["l2"][0].exp() * (m.body[0].weight ** 2).sum() \
                + meta["l2"][1].exp() * (m.body[4].weight ** 2).sum()

        return gimli.GimliSolver(model, loss_fn, opt, meta, scheduler=scheduler, mode=mode,
                                 val_loss_fn=lambda m, batch, meta: F.mse_loss(m.eval()(batch[0]), batch[1]))

    reverse, forward = both(make, batches[:12], batches[12])
    assert all(g.abs().sum() > 0 for g in reverse.values())
    assert_hypergradients_close(forward, reverse)


def test_forward_meta_batch_first_order_truncate_and_step_with_commit() -> None:
    batches = regression_batches(6, 3, 2, 25)
    torch.manual_seed(0)
    net = mlp([3, 5, 2], "tanh")
    tasks = [(batches[:8], batches[8]), (batches[9:17], batches[17])]

    def make(mode: str, **kw: Any) -> gimli.GimliSolver:
        model = copy.deepcopy(net)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        meta = gimli.MetaParams(opt, {"lr": "tensor", "beta2": "scalar"})
        meta_opt = torch.optim.SGD(meta.parameters(), lr=1e-3)
        return gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, meta_opt=meta_opt,
                                 mode=mode, **kw)

    for kw in [{}, {"first_order": True}, {"truncate": 5}]:
        reverse = make("reverse", **kw).hypergradient(tasks=tasks)
        forward = make("forward", **kw).hypergradient(tasks=tasks)
        assert_hypergradients_close(forward, reverse)
    # a meta-step that commits the unroll's end: the same model, optimizer state and
    # meta-parameters afterwards
    solvers = [make("reverse"), make("forward")]
    results = [s.step(batches[18:24], batches[24], commit=True) for s in solvers]
    assert results[0].train_losses == pytest.approx(results[1].train_losses, rel=1e-12)
    for a, b in zip(solvers[0].problem.module.parameters(), solvers[1].problem.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in zip(solvers[0].meta.parameters(), solvers[1].meta.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
    opts = [s.problem.inner.torch_optimizer for s in solvers]
    for p, q in zip(opts[0].param_groups[0]["params"], opts[1].param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opts[0].state[p][key], opts[1].state[q][key], rtol=1e-12, atol=0)


def test_forward_refuses_what_it_cannot_carry() -> None:
    model = mlp([3, 4, 2], "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = lambda m, b, meta: mse(m, b)  # noqa: E731
    with pytest.raises(ValueError, match="θ₀ .init=. has as many elements as the model"):
        gimli.GimliSolver(model, loss_fn, opt, gimli.MetaParams(opt, {"lr": "scalar"}, init=model),
                          mode="forward")
    with pytest.raises(ValueError, match="lr per 'element' has as many as the model"):
        gimli.GimliSolver(model, loss_fn, opt, gimli.MetaParams(opt, {"lr": "element"}), mode="forward")
    with pytest.raises(ValueError, match="mode='forward' keeps none"):
        gimli.GimliSolver(model, loss_fn, opt, gimli.MetaParams(opt, {"lr": "scalar"}), mode="forward",
                          memory="recompute")
    with pytest.raises(ValueError, match="mode must be 'reverse', 'forward', 'auto' or 'implicit'"):
        gimli.GimliSolver(model, loss_fn, opt, gimli.MetaParams(opt, {"lr": "scalar"}), mode="backward")
    # 4 per-tensor lrs + 1 momentum = 5 tangents, over 4 steps: reverse mode holds less
    solver = gimli.GimliSolver(model, loss_fn, opt, gimli.MetaParams(opt, {"lr": "tensor", "momentum": "scalar"}),
                               mode="forward")
    batches = regression_batches(0, 3, 2, 5)
    with pytest.raises(ValueError, match="carry 5 tangents .* more than the 4 steps"):
        solver.hypergradient(batches[:4], batches[4])
    assert solver.hypergradient(batches[:4] + batches[:1], batches[4]).keys() == {"hypers.lr", "hypers.momentum"}


# --- horizon="full": the tangents carry over from one committed meta-step to the next ---------
def _online(mode: str = "forward", horizon: str = "full", seed: int = 0) -> tuple[gimli.GimliSolver, Any]:
    torch.manual_seed(seed)
    model = mlp([3, 5, 2], "tanh")
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                          lr=0.1, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    meta = gimli.MetaParams(opt, {"lr": "group", "momentum": "scalar"},
                            loss={"l2": torch.tensor([-3.0, -4.0], dtype=torch.float64)})
    kw = {"horizon": horizon} if mode == "forward" else {}
    return gimli.GimliSolver(model, penalized, opt, meta, val_loss_fn=mse, scheduler=scheduler,
                             mode=mode, **kw), (model, opt, scheduler)


def test_full_horizon_equals_one_long_unroll() -> None:
    """With φ held (hypergradient(commit=True) does not update it), the hypergradient after
    k committed windows of J steps is that of one unroll over all k·J steps from the first
    weights: reverse mode over the concatenated batches is the oracle."""
    J, windows = 5, 3
    batches = regression_batches(8, 3, 2, J * windows + 1)
    val = batches[-1]
    online, _ = _online()
    got = [online.hypergradient(batches[k * J:(k + 1) * J], val, commit=True) for k in range(windows)]
    for k in range(windows):
        long, _ = _online("reverse")
        ref = long.hypergradient(batches[:(k + 1) * J], val)
        assert_hypergradients_close(got[k], ref)
    # a window's own hypergradient (horizon="window") differs once there is a past
    windowed, _ = _online(horizon="window")
    first = [windowed.hypergradient(batches[k * J:(k + 1) * J], val, commit=True) for k in range(2)][1]
    assert (first["hypers.lr"] - got[1]["hypers.lr"]).abs().max() > 1e-6


def test_full_horizon_guards_resumes_and_rolls_back(tmp_path: Any) -> None:
    J = 3
    batches = regression_batches(9, 3, 2, 4 * J + 1)
    val = batches[-1]
    online, (model, opt, scheduler) = _online()
    online.hypergradient(batches[:J], val, commit=True)
    # weights changed behind the solver's back: refused, until the horizon is reset
    with torch.no_grad():
        model[0].weight.add_(0.01)
    with pytest.raises(ValueError, match="reset_horizon"):
        online.hypergradient(batches[J:2 * J], val)
    with torch.no_grad():
        model[0].weight.sub_(0.01)          # the committed weights again: accepted
    online.hypergradient(batches[J:2 * J], val)
    # a call that fails leaves the carried tangents as they were: the retry gives what the
    # first try would have
    first_try = online.hypergradient(batches[J:2 * J], val)        # (no commit: changes nothing)
    original = online.problem.val_loss_fn

    def failing(m: Any, b: Any, meta: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    online.problem.val_loss_fn = failing
    with pytest.raises(RuntimeError, match="boom"):
        online.hypergradient(batches[J:2 * J], val, commit=True)
    online.problem.val_loss_fn = original
    retry = online.hypergradient(batches[J:2 * J], val)
    for name in first_try:
        assert torch.equal(retry[name], first_try[name]), name
    # resume: a new solver, model, optimizer and scheduler loaded from their state_dicts
    # continue bit for bit
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             copy.deepcopy(scheduler.state_dict()), copy.deepcopy(online.state_dict()))
    online.hypergradient(batches[J:2 * J], val, commit=True)
    expected = online.hypergradient(batches[2 * J:3 * J], val, commit=True)
    fresh, (model2, opt2, scheduler2) = _online(seed=1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    fresh.load_state_dict(saved[3])
    fresh.hypergradient(batches[J:2 * J], val, commit=True)
    got = fresh.hypergradient(batches[2 * J:3 * J], val, commit=True)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    fresh.reset_horizon()
    assert fresh.state_dict()["horizon"] is None
    with pytest.raises(ValueError, match="does not carry them"):
        _online(horizon="window")[0].load_state_dict(saved[3])
    with pytest.raises(ValueError, match="horizon='full' carries"):
        gimli.GimliSolver(model, penalized, opt, online.meta, horizon="full")


def test_auto_mode_picks_and_says_which() -> None:
    batches = regression_batches(4, 3, 2, 9)
    torch.manual_seed(0)
    net = mlp([3, 4, 2], "tanh")

    def make(mode: str, hypers: dict[str, str], init: bool = False) -> gimli.GimliSolver:
        model = copy.deepcopy(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        meta = gimli.MetaParams(opt, hypers, init=model if init else None)
        return gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, mode=mode)

    # 2 tangents, 8 steps: forward, said once
    auto = make("auto", {"lr": "scalar", "momentum": "scalar"})
    with pytest.warns(gimli.GimliInfo, match=r"chose mode='forward': 2 tangents .* 8 points"):
        got = auto.hypergradient(batches[:8], batches[8])
    assert auto.last_mode == "forward"
    assert_hypergradients_close(got, make("reverse", {"lr": "scalar", "momentum": "scalar"})
                                .hypergradient(batches[:8], batches[8]))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # not said again
        auto.hypergradient(batches[:8], batches[8])
    # as many tangents as steps, θ₀, per-element lrs: reverse
    with pytest.warns(gimli.GimliInfo, match=r"chose mode='reverse': 4 tangents .* 2 points"):
        make("auto", {"lr": "tensor"}).hypergradient(batches[:2], batches[8])
    with pytest.warns(gimli.GimliInfo, match=r"chose mode='reverse': .*θ₀"):
        solver = make("auto", {"lr": "scalar"}, init=True)
        solver.hypergradient(batches[:8], batches[8])
    assert solver.last_mode == "reverse"
    with pytest.warns(gimli.GimliInfo, match=r"chose mode='reverse': .*per 'element'"):
        make("auto", {"lr": "element"}).hypergradient(batches[:8], batches[8])


def test_the_checker_takes_a_forward_mode_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """gimli.check compares the solver's own hypergradient (here forward mode's) with the
    full autograd unroll and finite differences of the real training loop."""
    import gimli._solver
    calls = []
    original = gimli._solver.forward_hypergradient

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gimli._solver, "forward_hypergradient", counted)
    torch.manual_seed(0)
    model = mlp([3, 6, 1], "tanh")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    meta = gimli.MetaParams(opt, {"lr": "scalar", "beta1": "scalar"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, mode="forward")
    batches = regression_batches(2, 3, 1, 6)
    report = gimli.check(solver, batches[:5], batches[5])
    assert report.passed, report
    assert calls                    # the copy it checked ran in forward mode
