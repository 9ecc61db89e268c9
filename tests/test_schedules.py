"""Learning-rate schedules inside the unroll (``gimli/_schedule.py``).

Oracles: the real ``torch.optim.lr_scheduler`` stepping the real optimizer (each
step's lr and momentum, bit for bit); a fresh scheduler built at the meta-learned
base lr (re-basing); central finite differences of real training with the real
scheduler built at base lr φ ± h (the hypergradient of a learned base lr); and the
full autograd unroll.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import Tensor
from torch.optim import lr_scheduler as L

import gimli
from strategies import mlp, mse, regression_batches
from test_oracle import richardson
from test_sweep import assert_hypergradients_close

STEPS = 4           # J
PRE = 2             # steps the user's own training takes before the unroll
Factory = Callable[[torch.optim.Optimizer, list[float]], Any]     # (optimizer, its base lrs)

# every schedule of the step count in torch.optim.lr_scheduler, and nestings; each
# crosses a milestone, restart or phase change within steps PRE … PRE + J
SCHEDULERS: dict[str, Factory] = {
    "LambdaLR": lambda o, b: L.LambdaLR(o, lambda t: 1.0 / (1.0 + 0.3 * t)),
    "MultiplicativeLR": lambda o, b: L.MultiplicativeLR(o, lambda t: 0.85),
    "StepLR": lambda o, b: L.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o, b: L.MultiStepLR(o, milestones=[1, 4, 6], gamma=0.3),
    "ConstantLR": lambda o, b: L.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o, b: L.LinearLR(o, start_factor=0.2, total_iters=5),
    "ExponentialLR": lambda o, b: L.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o, b: L.PolynomialLR(o, total_iters=7, power=2.0),
    "CosineAnnealingLR": lambda o, b: L.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
    "CosineAnnealingWarmRestarts": lambda o, b: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2,
                                                                              eta_min=0.005),
    "CyclicLR": lambda o, b: L.CyclicLR(o, base_lr=b, max_lr=0.3, step_size_up=3),
    "OneCycleLR": lambda o, b: L.OneCycleLR(o, max_lr=[5 * x for x in b], total_steps=20, div_factor=5.0),
    "SequentialLR": lambda o, b: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.1, total_iters=3), L.CosineAnnealingLR(o, T_max=6, eta_min=0.01)],
        milestones=[3]),
    "ChainedScheduler": lambda o, b: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.5, total_iters=4), L.ExponentialLR(o, gamma=0.9)], optimizer=o),
    "SequentialLR(ChainedScheduler)": lambda o, b: L.SequentialLR(
        o, [L.ChainedScheduler([L.LinearLR(o, start_factor=0.2, total_iters=3), L.ExponentialLR(o, gamma=0.9)],
                               optimizer=o),
            L.CosineAnnealingLR(o, T_max=5, eta_min=0.01)], milestones=[4]),
    "ChainedScheduler(SequentialLR)": lambda o, b: L.ChainedScheduler(
        [L.SequentialLR(o, [L.ConstantLR(o, factor=0.3, total_iters=2), L.ExponentialLR(o, gamma=0.9)],
                        milestones=[3]),
         L.StepLR(o, step_size=2, gamma=0.7)], optimizer=o),
}
COMPOSITE = [name for name in SCHEDULERS if "Sequential" in name or "Chained" in name]
CYCLES_MOMENTUM = ["CyclicLR", "OneCycleLR"]
BASES = {"scalar": [0.1, 0.1], "group": [0.1, 0.05], None: [0.1, 0.05]}


def objects(name: str, bases: list[float], seed: int = 0) -> tuple[Any, Any, Any]:
    """Model, SGD with momentum over two param groups with base lrs ``bases``, scheduler."""
    torch.manual_seed(seed)
    model = mlp([2, 4, 1], "tanh")
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": bases[0]}, {"params": params[2:], "lr": bases[1]}],
                          momentum=0.9)
    with warnings.catch_warnings():     # SequentialLR(ChainedScheduler) steps a child at construction
        warnings.simplefilter("ignore", UserWarning)
        return model, opt, SCHEDULERS[name](opt, bases)


def train(model: Any, opt: Any, sched: Any, batches: list[Any]) -> list[list[tuple[float, float]]]:
    """Real training with the real scheduler; each step's (lr, momentum) per group."""
    seen = []
    with warnings.catch_warnings():     # a copied optimizer's step is not the one the scheduler wrapped
        warnings.simplefilter("ignore", UserWarning)
        for batch in batches:
            seen.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
            sched.step()
    return seen


def step_scheduler(sched: Any, n: int) -> None:
    with warnings.catch_warnings():     # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(n):
            sched.step()


class Setup:
    """A solver over ``objects(name, ...)`` learning the lr at ``learn`` (or nothing),
    built before (or after) the user's own PRE training steps."""

    def __init__(self, name: str, learn: str | None, before: bool = True, init: bool = False,
                 **hypers: str):
        self.name = name
        self.model, self.opt, self.sched = objects(name, BASES[learn])
        data = regression_batches(0, 2, 1, PRE + 2 * STEPS + 1)
        self.meta = gimli.MetaParams(self.opt, {**({} if learn is None else {"lr": learn}), **hypers},
                                     init=self.model if init else None)
        if not before:
            self.user_steps(data[:PRE])
        self.solver = gimli.GimliSolver(
            self.model, lambda m, b, meta: mse(m, b), self.opt, self.meta, scheduler=self.sched,
            val_loss_fn=mse, meta_opt=torch.optim.Adam(self.meta.parameters(), lr=1e-2)
            if learn is not None else None)
        if before:
            self.user_steps(data[:PRE])
        self.batches, self.more, self.val = data[PRE:PRE + STEPS], data[PRE + STEPS:-1], data[-1]

    def user_steps(self, batches: list[Any]) -> None:
        train(self.model, self.opt, self.sched, batches)

    def meta_step(self) -> None:
        """A meta-step with commit (a hypergradient with commit when nothing is learned)."""
        if self.solver.meta_opt is None:
            self.solver.hypergradient(self.batches, self.val, commit=True)
        else:
            self.solver.step(self.batches, self.val, commit=True)


def cases(names: list[str], learns: list[str | None]) -> list[Any]:
    return [pytest.param(name, learn, id=f"{name}-{learn}") for name in names for learn in learns]


# --- values: bit for bit the real scheduler's ----------------------------------------------
def assert_unroll_uses_the_real_schedule(setup: Setup) -> None:
    problem = setup.solver.problem
    schedule = problem.schedule(STEPS)
    hp = problem.hypers(differentiable=False)
    seen = train(*copy.deepcopy((setup.model, setup.opt, setup.sched)), setup.batches)
    first = [sl.start for sl in problem.inner.groups]
    for j in range(STEPS):
        hp_j = schedule.at(j, hp)
        assert [(hp_j["lr"][i].item(), hp_j["momentum"][i].item()) for i in first] == seen[j], j


@pytest.mark.parametrize("name,learn", cases(list(SCHEDULERS), [None, "scalar", "group"]))
def test_each_step_uses_the_real_schedulers_values(name: str, learn: str | None) -> None:
    """The unroll's lr and momentum at each step are exactly those the real scheduler
    sets stepping the real optimizer: from where the user's training left it, and
    again after meta-steps with commits moved it (and re-based it on the learned lr)
    and after more of the user's own steps."""
    setup = Setup(name, learn)
    for batch in setup.more[:3]:
        assert_unroll_uses_the_real_schedule(setup)
        setup.meta_step()
        assert_unroll_uses_the_real_schedule(setup)
        setup.user_steps([batch])


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n not in COMPOSITE])
def test_solver_built_on_a_scheduler_that_has_stepped(name: str) -> None:
    """A single scheduler that has already stepped is followed from where it is (its
    shadows are replayed once from its start)."""
    setup = Setup(name, "group", before=False)
    assert_unroll_uses_the_real_schedule(setup)
    setup.meta_step()
    assert_unroll_uses_the_real_schedule(setup)


# --- re-basing: the scheduler runs as if built at the learned base lr ----------------------
@pytest.mark.parametrize("name,learn", cases(list(SCHEDULERS), ["scalar", "group"]))
def test_meta_steps_rebase_every_scheduler_inside(name: str, learn: str) -> None:
    """After meta-steps (with commits, between the user's own steps), the user's
    scheduler sets the lrs of a fresh one built at the learned base lrs and stepped as
    often, now and at each following step."""
    setup = Setup(name, learn)
    for batch in setup.more[:2]:
        setup.meta_step()
        setup.user_steps([batch])
    learned = setup.meta.hyper("lr").detach().expand(2).tolist()
    assert all(abs(x - b) > 1e-3 for x, b in zip(learned, BASES[learn]))
    _, fresh_opt, fresh = objects(name, learned)
    step_scheduler(fresh, PRE + 2 * STEPS + 2)
    for _ in range(5):
        assert [g["lr"] for g in setup.opt.param_groups] == \
            pytest.approx([g["lr"] for g in fresh_opt.param_groups], rel=1e-12, abs=1e-15)
        assert setup.sched.get_last_lr() == pytest.approx(fresh.get_last_lr(), rel=1e-12, abs=1e-15)
        step_scheduler(setup.sched, 1)
        step_scheduler(fresh, 1)


# --- hypergradients -------------------------------------------------------------------------
def real_val_loss(setup: Setup, bases: list[float], position: int) -> float:
    """L^val after J steps of real training from the model's and optimizer's current
    state, with the real scheduler built at base lrs ``bases`` and stepped to
    ``position``."""
    model = copy.deepcopy(setup.model)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": bases[0]}, {"params": params[2:], "lr": bases[1]}],
                          momentum=0.9)
    for p, q in zip(setup.model.parameters(), params):
        if "momentum_buffer" in setup.opt.state[p]:
            opt.state[q]["momentum_buffer"] = setup.opt.state[p]["momentum_buffer"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sched = SCHEDULERS[setup.name](opt, bases)
    step_scheduler(sched, position)
    train(model, opt, sched, setup.batches)
    return mse(model, setup.val).item()


def finite_differences(setup: Setup, learn: str, position: int) -> list[float]:
    bases = setup.meta.hyper("lr").detach().expand(2).tolist()
    if learn == "scalar":
        return [richardson(lambda x: real_val_loss(setup, [x, x], position), bases[0], 1e-3 * bases[0])]
    out = []
    for g in range(2):
        def f(x: float, g: int = g) -> float:
            return real_val_loss(setup, [x if h == g else b for h, b in enumerate(bases)], position)
        out.append(richardson(f, bases[g], 1e-3 * bases[g]))
    return out


@pytest.mark.parametrize("name,learn,before", [
    *[pytest.param(*c.values, True, id=c.id) for c in cases(list(SCHEDULERS), ["scalar", "group"])],
    *[pytest.param(name, "group", False, id=f"{name}-group-built after it stepped")
      for name in SCHEDULERS if name not in COMPOSITE]])
def test_base_lr_hypergradient_matches_finite_differences(name: str, learn: str, before: bool) -> None:
    """d L^val / d(base lr) against central differences of real training with the real
    scheduler built at base lr φ ± h (for CyclicLR its base_lr; for OneCycleLR its
    max_lr scaled alike), after the user's own steps moved the scheduler; the solver
    built before them, or (a single scheduler) after."""
    setup = Setup(name, learn, before=before)
    got = setup.solver.hypergradient(setup.batches, setup.val)["hypers.lr"].reshape(-1).tolist()
    assert got == pytest.approx(finite_differences(setup, learn, PRE), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_hypergradients_match_the_autograd_unroll(name: str) -> None:
    """Group lrs, with momentum (where the scheduler leaves it alone) and θ₀."""
    learn = {} if name in CYCLES_MOMENTUM else {"momentum": "scalar"}
    setup = Setup(name, "group", init=True, **learn)
    solver = setup.solver
    before = copy.deepcopy(setup.sched.state_dict())
    got = solver.hypergradient(setup.batches, setup.val)
    assert repr(setup.sched.state_dict()) == repr(before)      # an unroll does not advance it
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, setup.batches, setup.val))


# --- cost: O(J) per meta-step, light copies -------------------------------------------------
@pytest.mark.parametrize("name", ["CosineAnnealingLR", "SequentialLR(ChainedScheduler)"])
def test_scheduler_steps_per_meta_step_do_not_grow(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """scheduler.step() calls (of the user's scheduler's class: copies included) per
    meta-step with commit are the same at meta-step 60 as at meta-step 5, and O(J). The
    replay from the first step made them grow by 3J per meta-step."""
    setup = Setup(name, "group")
    cls = type(setup.sched)
    original = cls.step
    calls = [0]

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", counted)
    per_meta_step = []
    for _ in range(12):
        before = calls[0]
        setup.meta_step()
        per_meta_step.append(calls[0] - before)
    assert per_meta_step[-1] == per_meta_step[4] <= 8 * STEPS


def test_optimizer_parameters_and_state_are_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Following the schedule copies no tensor of the model's size: the optimizer is
    copied without its parameters and state."""
    setup = Setup("SequentialLR", "group")
    setup.meta_step()
    setup.user_steps(setup.more[:1])
    copied = []
    original = Tensor.__deepcopy__

    def watched(self: Tensor, memo: dict[int, Any]) -> Tensor:
        copied.append(self.numel())
        return original(self, memo)

    monkeypatch.setattr(Tensor, "__deepcopy__", watched)
    setup.solver.problem.schedule(STEPS)
    assert max(copied, default=0) == 0


# --- a long online run ----------------------------------------------------------------------
def warmup_cosine(opt: torch.optim.Optimizer, eta_min: float) -> Any:
    return L.SequentialLR(opt, [L.LinearLR(opt, start_factor=0.1, total_iters=10),
                                L.CosineAnnealingLR(opt, T_max=100, eta_min=eta_min)], milestones=[10])


@pytest.mark.parametrize("eta_min", [0.0, -1e-4])
def test_long_online_run_through_zero_lr(eta_min: float) -> None:
    """400 meta-steps with commit=True (J = 2) under warm-up then cosine decay: the lr
    goes to 0 four times (through it, with eta_min < 0). Every meta-step goes through;
    at the end the scheduler sets the lrs of a fresh one built at the learned base lr,
    on through the next 0, and the hypergradient of the base lr matches finite
    differences of real training with such a fresh scheduler."""
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = warmup_cosine(opt, eta_min)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    data = regression_batches(3, 2, 1, 12)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse, meta_opt=torch.optim.SGD(meta.parameters(), lr=1e-4),
                               steps=2, train_data=data[:10], val_data=data[10:])
    lrs = []
    for _ in range(400):
        solver.step(commit=True)
        lrs.append(opt.param_groups[0]["lr"])
    base = meta.hyper("lr").item()
    assert sched.last_epoch == 800 and 0.01 < base < 0.2 and base != 0.05
    assert min(lrs) < 0 if eta_min < 0 else min(lrs) < 1e-4 * base

    def fresh(x: float) -> tuple[Any, Any, Any]:
        """Model and optimizer as they are now, the scheduler built at base lr x."""
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=x, momentum=0.9)
        for p, q in zip(model.parameters(), twin.parameters()):
            twin_opt.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
        twin_sched = warmup_cosine(twin_opt, eta_min)
        step_scheduler(twin_sched, sched.last_epoch)
        return twin, twin_opt, twin_sched

    batches, val = data[:2], data[10]

    def val_loss(x: float) -> float:
        twin, twin_opt, twin_sched = fresh(x)
        train(twin, twin_opt, twin_sched, batches)
        return mse(twin, val).item()

    got = solver.hypergradient(batches, val)["hypers.lr"].item()
    assert got == pytest.approx(richardson(val_loss, base, 1e-3 * base), rel=1e-6, abs=1e-10)
    _, twin_opt, twin_sched = fresh(base)
    for _ in range(60):
        assert opt.param_groups[0]["lr"] == pytest.approx(twin_opt.param_groups[0]["lr"], abs=1e-12 * base)
        step_scheduler(sched, 1)
        step_scheduler(twin_sched, 1)


def test_rounding_on_an_lr_near_zero_is_not_an_inconsistency() -> None:
    """At step T_max − 1 of a cosine schedule over 10,000 steps the lr is 2.5e-8 of the
    base lr. A difference of one unit in the last place of the base lr (what re-basing
    and stepping round) is 6e-9 of that lr: tolerated, since the check is relative to
    the problem's lr scale (the base lr), not to an lr that passes through 0. A
    difference of 1e-6 of the base lr is an lr set outside the scheduler."""
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "tanh")
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1, momentum=0.9)
    sched = L.CosineAnnealingLR(opt, T_max=10_000)
    meta = gimli.MetaParams(opt, {"lr": "group"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched, val_loss_fn=mse)
    step_scheduler(sched, 10_000 - 1)
    batches = regression_batches(0, 2, 1, STEPS + 1)
    group = opt.param_groups[0]
    lr, base = group["lr"], group["initial_lr"]
    assert 0 < lr < 3e-8 * base
    group["lr"] = lr + math.ulp(base)
    solver.hypergradient(batches[:STEPS], batches[-1])
    group["lr"] = lr + 1e-6 * base
    with pytest.raises(ValueError, match="changed outside the scheduler"):
        solver.hypergradient(batches[:STEPS], batches[-1])


# --- resuming and failing ------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Bit-identical nested dicts/lists/tensors/numbers."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b) or (a != a and b != b)


def resumable(seed: int) -> tuple[gimli.GimliSolver, Any, Any, Any]:
    """Online learning of group lrs and momentum under SequentialLR(ChainedScheduler),
    the solver drawing its own batches (J = 2, a pass of 5)."""
    model, opt, sched = objects("SequentialLR(ChainedScheduler)", BASES["group"], seed)
    meta = gimli.MetaParams(opt, {"lr": "group", "momentum": "scalar"})
    data = regression_batches(1, 2, 1, 8)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse, meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2),
                               steps=2, train_data=data[:5], val_data=data[5:])
    return solver, model, opt, sched


def test_resumed_run_is_bit_identical() -> None:
    solver, model, opt, sched = resumable(0)
    for _ in range(3):
        solver.step(commit=True)
    train(model, opt, sched, regression_batches(2, 2, 1, 1))      # and one step of the user's own
    buffer = io.BytesIO()
    torch.save({"solver": solver.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    went_on = [solver.step(commit=True) for _ in range(4)]

    resumed, model2, opt2, sched2 = resumable(1)    # other weights: everything must come back
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["solver"])
    again = [resumed.step(commit=True) for _ in range(4)]
    assert again == went_on                         # losses and hypergradient norms, exactly
    ours, theirs = resumed.state_dict(), solver.state_dict()
    assert same({k: v for k, v in ours.items() if k != "data"}, {k: v for k, v in theirs.items() if k != "data"})
    assert same(sched2.state_dict(), sched.state_dict())
    assert same(opt2.state_dict(), opt.state_dict())


def test_failed_step_changes_nothing_of_the_schedule() -> None:
    """A meta-step that fails after the user's scheduler moved (so the step first
    follows it) leaves the scheduler, the param groups and the solver's state
    bit-identical; the next step is that of a solver that never failed."""
    solver, model, opt, sched = resumable(0)
    twin = resumable(0)
    for s in (solver, twin[0]):
        s.step(commit=True)
    for objects_ in ((model, opt, sched), twin[1:]):
        train(*objects_, regression_batches(2, 2, 1, 2))
    before = (copy.deepcopy(solver.state_dict()), copy.deepcopy(sched.state_dict()),
              copy.deepcopy(opt.state_dict()))
    x, y = regression_batches(4, 2, 1, 1)[0]
    with pytest.raises(FloatingPointError):
        solver.step([(x, y * float("nan")), (x, y)], (x, y), commit=True)
    assert same((solver.state_dict(), sched.state_dict(), opt.state_dict()), before)
    assert solver.step(commit=True) == twin[0].step(commit=True)
    assert same(solver.state_dict(), twin[0].state_dict())


# --- what is refused, and how --------------------------------------------------------------
def test_composite_scheduler_that_has_stepped_is_refused_with_lr_learned() -> None:
    model, opt, sched = objects("SequentialLR", BASES["group"])
    train(model, opt, sched, regression_batches(0, 2, 1, 2))
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, {}),
                               scheduler=sched)          # values only: fine
    assert solver.problem.schedule(STEPS) is not None
    with pytest.raises(ValueError, match=r"SequentialLR has already stepped 2 times.*before its first step"):
        gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                          gimli.MetaParams(opt, {"lr": "group"}), scheduler=sched)


def test_lr_set_outside_the_scheduler_is_named() -> None:
    setup = Setup("CosineAnnealingLR", "group")
    setup.opt.param_groups[1]["lr"] = 0.3
    with pytest.raises(ValueError, match=r"param group 1's lr .* changed outside the scheduler"):
        setup.solver.hypergradient(setup.batches, setup.val)


def test_scheduler_must_be_passed_when_lr_is_learned() -> None:
    model, opt, sched = objects("StepLR", BASES["group"])
    with pytest.raises(ValueError, match="scheduler="):
        gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, {"lr": "group"}))
    for name in CYCLES_MOMENTUM:
        model, opt, sched = objects(name, BASES["group"])
        with pytest.raises(ValueError, match="changes momentum at every step, so it cannot be meta-learned"):
            gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                              gimli.MetaParams(opt, {"momentum": "scalar"}), scheduler=sched)


class SetTo(torch.optim.Optimizer):
    """A meta-'optimizer' that sets the meta-parameters to given values (to drive a
    learned base lr through 0 and back deterministically)."""

    def __init__(self, params: Any, value: float):
        super().__init__(params, {"value": value})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(group["value"])


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "SequentialLR", "OneCycleLR", "StepLR"])
def test_learned_base_lr_through_zero_and_back(name: str) -> None:
    """A meta-update that would make the base lr negative projects it onto 0; the user's
    scheduler then runs at base 0 (no lr below 0 is written), and the next meta-update
    moves it up again: the scheduler then equals a fresh one built at the new base."""
    setup = Setup(name, "group")
    solver = setup.solver
    solver.meta_opt = SetTo(setup.meta.parameters(), -1.0)
    setup.meta_step()
    assert setup.meta.hyper("lr").detach().tolist() == [0.0, 0.0]
    assert all(g["lr"] >= 0 and g["initial_lr"] == 0 for g in setup.opt.param_groups)
    setup.user_steps(setup.more[:1])
    solver.meta_opt = SetTo(setup.meta.parameters(), 0.07)
    setup.meta_step()
    _, fresh_opt, fresh = objects(name, [0.07, 0.07])
    step_scheduler(fresh, PRE + 2 * STEPS + 1)
    for _ in range(4):
        assert [g["lr"] for g in setup.opt.param_groups] == \
            pytest.approx([g["lr"] for g in fresh_opt.param_groups], rel=1e-12, abs=1e-15)
        step_scheduler(setup.sched, 1)
        step_scheduler(fresh, 1)


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "SequentialLR"])
def test_log_parameterised_base_lr(name: str) -> None:
    """lr learned as log lr under a scheduler: the hypergradient is w.r.t. log lr (the
    full autograd unroll), and the scheduler is re-based on exp(z), the lr itself."""
    model, opt, sched = objects(name, [0.1, 0.05])
    meta = gimli.MetaParams(opt, {"lr": "group"}, transform={"lr": "log"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, scheduler=sched,
                               val_loss_fn=mse, meta_opt=torch.optim.SGD(meta.parameters(), lr=0.1))
    data = regression_batches(3, 2, 1, STEPS + 1)
    assert_hypergradients_close(solver.hypergradient(data[:STEPS], data[STEPS]),
                                gimli.full_unroll_hypergradient(solver, data[:STEPS], data[STEPS]))
    solver.step(data[:STEPS], data[STEPS])
    lrs = meta.hyper("lr").detach().exp().tolist()
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx(lrs, rel=1e-15)
    _, fresh_opt, fresh = objects(name, lrs)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in fresh_opt.param_groups],
                                                               rel=1e-12)
