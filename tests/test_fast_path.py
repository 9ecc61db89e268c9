"""What the engine keeps from one optimizer call to the next, and that keeping it changes
no number.

The unroll and the sweep pass each call's results on as :class:`~gimli.optim._rule.Laid`
lists (per-tensor views with their flat tensor, so the next call joins nothing), and an
optimizer keeps its calls, each call its plan and its hyperparameters spread over the
elements. Oracle: a solver built afresh from copies of the same model, optimizer and
meta-parameters, which has kept nothing; its hypergradient must be bit-identical,
meta-step after meta-step, while the meta-optimizer changes the learned values in place
and the optimizer's state is committed."""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gimli
from gimli.optim import BUILTIN, SUPPORTED, bind
from gimli.optim._rule import Laid, Segments
from optim_db import OPTIM_DB, OptimRow
from strategies import meta_choices, problems, regression_batches
from test_sweep import build


class OpCount(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.ops.values())


def test_values_only_records_no_graph_and_restores_the_grad_mode() -> None:
    """The sweep's and the unroll's ``values_only`` is ``torch.no_grad()``: no graph inside,
    and the grad mode it found restored after it, also where the block raises."""
    from gimli._problem import values_only
    x = torch.ones(2, requires_grad=True)
    for outer in (True, False):
        with torch.set_grad_enabled(outer):
            with values_only():
                assert not torch.is_grad_enabled()
                y = x * 2
            assert not y.requires_grad and torch.is_grad_enabled() == outer
            with pytest.raises(KeyError), values_only():
                raise KeyError("inside")
            assert torch.is_grad_enabled() == outer


def test_laid_list_joins_free_until_an_entry_is_replaced() -> None:
    shapes = [(2, 3), (3,), (1,)]
    seg = Segments([torch.zeros(s, dtype=torch.float64) for s in shapes])
    flat = torch.arange(10, dtype=torch.float64)
    views = seg.split(flat)
    assert isinstance(views, Laid) and seg.join(views) is flat
    views[1].mul_(2)                                    # in place: the flat tensor changes with it
    assert seg.join(views) is flat and flat[6:9].tolist() == [12.0, 14.0, 16.0]
    views[0] = torch.full((2, 3), -1.0, dtype=torch.float64)    # replaced: joined anew
    joined = seg.join(views)
    assert joined is not flat
    assert joined.tolist() == [-1.0] * 6 + [12.0, 14.0, 16.0, 9.0]
    more = seg.split(flat)
    more.append(torch.zeros(1))
    assert more.flat is None


def test_split_views_of_a_flat_inside_a_larger_tensor() -> None:
    """A flat result can start inside a larger storage (a slice); its split views are
    the slices of it, in the tensors' shapes, with and without a graph."""
    shapes = [(2, 3), (3,), (1,)]
    seg = Segments([torch.zeros(s, dtype=torch.float64) for s in shapes])
    big = torch.arange(20, dtype=torch.float64)
    for flat in (big[7:17], big[7:17].clone().requires_grad_()):
        views = seg.split(flat)
        expected = [flat[0:6].reshape(2, 3), flat[6:9], flat[9:10]]
        assert [tuple(v.shape) for v in views] == shapes
        assert all(torch.equal(v, e) for v, e in zip(views, expected))
        assert all(v.data_ptr() == e.data_ptr() for v, e in zip(views, expected))


def test_a_hyperparameter_changed_in_place_is_spread_anew() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    inner = bind(opt)
    params = [p.detach().clone() for p in inner.params]
    grads = [torch.randn_like(p) for p in params]
    state = inner.read_state()
    hp = inner.constant_hypers()
    hp["lr"] = [torch.tensor(0.1 * (i + 1), dtype=torch.float64) for i in range(len(params))]
    first, _ = inner.step(params, state, grads, hp)
    hp["lr"][2].mul_(3)                                 # as a meta-optimizer updates its leaf
    second, _ = inner.step(params, state, grads, hp)
    fresh, _ = bind(opt).step(params, state, grads, hp)
    for a, b, c in zip(first, second, fresh):
        assert torch.equal(b, c)
    assert not torch.equal(first[2], second[2]) and torch.equal(first[0], second[0])


def _loss(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(m(x), y)


@pytest.mark.parametrize("which", ["sgd_momentum", "adam", "nadam"])
def test_hypergradients_of_a_long_run_equal_a_fresh_solvers(which: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    if which == "sgd_momentum":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        learned = {"lr": "tensor", "momentum": "scalar"}
    elif which == "adam":
        opt = torch.optim.Adam([{"params": model[0].parameters()},
                                {"params": model[2].parameters(), "lr": 0.02}], lr=0.01)
        learned = {"lr": "tensor", "beta1": "group"}
    else:
        opt = torch.optim.NAdam(model.parameters(), lr=0.01)
        learned = {"lr": "tensor"}
    meta = gimli.MetaParams(opt, learned)
    meta_opt = torch.optim.SGD(meta.parameters(), lr=1e-3)
    solver = gimli.GimliSolver(model, _loss, opt, meta, meta_opt=meta_opt)
    batches = regression_batches(2, 3, 1, 16)
    for k in range(3):
        train, val = batches[5 * k:5 * k + 4], batches[5 * k + 4]
        got = solver.hypergradient(train, val)
        model2, opt2, meta2 = copy.deepcopy((model, opt, meta))
        want = gimli.GimliSolver(model2, _loss, opt2, meta2).hypergradient(train, val)
        assert got.keys() == want.keys()
        for name in want:
            assert want[name].abs().max() > 0, name
            assert torch.equal(got[name], want[name]), (k, name)
        solver.step(train, val, commit=True)            # the learned values change in place


class _Logged(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (as a user's wrapper tensor)."""

    seen = 0

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cls.seen += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_grad_of_equals_autograd_grad() -> None:
    from gimli._problem import grad_of
    torch.manual_seed(3)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    const = torch.randn(3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = torch.tanh(x @ w.T + b).pow(2).sum()
    G = grad_of(loss, [w, const, b, unused], create_graph=True)
    want = torch.autograd.grad(loss, [w, b, unused], create_graph=True, allow_unused=True)
    assert G[1] is None and G[3] is None and want[2] is None
    assert torch.equal(G[0], want[0]) and torch.equal(G[2], want[1])
    o = [torch.randn_like(w), torch.randn_like(b)]
    ref = torch.autograd.grad([want[0], want[1]], [w, b], o, retain_graph=True)
    hvp = grad_of([G[0], G[2]], [w, b], o)
    assert all(torch.equal(h, r) for h, r in zip(hvp, ref))
    # a tensor with its own __torch_function__ goes through torch.autograd.grad, which dispatches it
    v = torch.randn(3, dtype=torch.float64).as_subclass(_Logged).requires_grad_()
    before = _Logged.seen
    (gv,) = grad_of((v * v).sum(), [v])
    assert _Logged.seen > before and torch.allclose(gv.as_subclass(torch.Tensor), 2 * v.detach().as_subclass(torch.Tensor))


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.a = nn.Linear(5, 1)
        self.b = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        return getattr(self, head)(torch.tanh(self.body(x)))


def _head_loss(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
    x, y, head = batch
    return F.mse_loss(m(x, head), y)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_tensors_without_a_gradient_on_some_steps_step_as_torch_optim(name: str) -> None:
    """Head b is read on every third step only: its gradient is None on the others, where
    torch.optim leaves it and its state alone (no weight decay, no step count). The calls
    kept for one pattern of None gradients must not be reused for another (SGD without
    momentum: a state with nothing per tensor, so its calls are kept from step to step)."""
    torch.manual_seed(4)
    model = _TwoHeads().double()
    make = getattr(torch.optim, name)
    opt = make(model.parameters(), lr=0.05, weight_decay=0.01)
    meta = gimli.MetaParams(opt, {"lr": "tensor"})
    solver = gimli.GimliSolver(model, _head_loss, opt, meta)
    raw = regression_batches(5, 3, 1, 13)
    batches = [(x, y, "b" if j % 3 == 2 else "a") for j, (x, y) in enumerate(raw)]
    train, val = batches[:12], batches[12]
    ref_model = copy.deepcopy(model)
    ref_opt = make(ref_model.parameters(), lr=0.05, weight_decay=0.01)
    got = solver.hypergradient(train[:6], val)             # fills the kept calls once
    want = gimli.full_unroll_hypergradient(solver, train[:6], val)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-14), key
    solver.hypergradient(train, val, commit=True)
    for x, y, head in train:
        ref_opt.zero_grad(set_to_none=True)
        F.mse_loss(ref_model(x, head), y).backward()
        ref_opt.step()
    for (key, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), key
        if name == "Adam":
            s, r = opt.state[p], ref_opt.state[q]
            assert float(s["step"]) == float(r["step"]), key      # b's head: 4 steps, not 12
            assert torch.allclose(s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-12, atol=1e-16), key


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_vjp_reading_the_state_it_produced_is_bit_identical(amsgrad: bool, decoupled: bool,
                                                                  maximize: bool) -> None:
    """The sweep hands Adam's VJP σ_{j+1} (``after=``), whose moments it then reads instead
    of recomputing: the same bits, for every flag."""
    from gimli.optim import adam
    torch.manual_seed(5)
    n = 7
    p, g, m, P, Sm, Sv = (torch.randn(n, dtype=torch.float64) for _ in range(6))
    v, vmax = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    v[0] = vmax[0] = 0.0                                    # the guarded √0
    flags = adam.Flags(amsgrad, maximize, decoupled)
    state = adam.State(3, m, v, vmax if amsgrad else None)
    hp = {"lr": torch.full((n,), 0.01, dtype=torch.float64), "beta1": torch.tensor(0.9, dtype=torch.float64),
          "beta2": torch.tensor(0.99, dtype=torch.float64), "eps": torch.tensor(1e-8, dtype=torch.float64),
          "weight_decay": torch.tensor(0.1, dtype=torch.float64)}
    S = adam.State(0, Sm, Sv, torch.randn(n, dtype=torch.float64) if amsgrad else None)
    need = frozenset(adam.HYPERS)
    _, after = adam.step(flags, p, state, g, hp)
    plain = adam.vjp(flags, p, state, g, hp, P, S, need)
    read = adam.vjp(flags, p, state, g, hp, P, S, need, after=after)
    pairs = [(plain.params, read.params), (plain.grads, read.grads)] + \
        [(a, b) for a, b in zip(plain.state[1:], read.state[1:]) if a is not None] + \
        [(plain.hypers[k], read.hypers[k]) for k in need]
    for a, b in pairs:
        assert torch.equal(a, b)



def _sgd_point(seed: int, n: int, nesterov: bool) -> tuple[Any, ...]:
    """θ, G, a momentum buffer, P, S_buf (float64, n elements each) and SGD's hyperparameters
    (γ per element, the others 0-dim; τ = 0 under Nesterov, as torch.optim requires)."""
    torch.manual_seed(seed)
    p, g, buf, P, Sb = (torch.randn(n, dtype=torch.float64) for _ in range(5))
    hp = {"lr": torch.full((n,), 0.05, dtype=torch.float64), "momentum": torch.tensor(0.9, dtype=torch.float64),
          "dampening": torch.tensor(0.0 if nesterov else 0.1, dtype=torch.float64),
          "weight_decay": torch.tensor(0.01, dtype=torch.float64)}
    return p, g, buf, P, Sb, hp


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_sgd_vjp_reading_the_buffer_it_produced_is_bit_identical(nesterov: bool, maximize: bool,
                                                                  first: bool) -> None:
    """SGD's VJP reads the new momentum buffer from ``after=`` where the cotangents of γ
    and μ need it: the same bits as recomputing it, on the first step (no buffer yet) and
    after it."""
    from gimli.optim import sgd
    p, g, buf, P, Sb, hp = _sgd_point(10, 7, nesterov)
    flags = sgd.Flags(True, nesterov, maximize)
    state = sgd.State(None if first else buf)
    S = sgd.State(Sb)
    need = frozenset(sgd.HYPERS)
    _, after = sgd.step(flags, p, state, g, hp)
    plain = sgd.vjp(flags, p, state, g, hp, P, S, need)
    read = sgd.vjp(flags, p, state, g, hp, P, S, need, after=after)
    assert torch.equal(plain.params, read.params) and torch.equal(plain.grads, read.grads)
    for name in need:
        a, b = plain.hypers[name], read.hypers[name]
        assert (a is None and b is None) or torch.equal(a, b), name
    assert plain.hypers["lr"] is not None                   # (μ̄ is None only where b' = d₀)
    assert (plain.hypers["momentum"] is None) == (first and not nesterov)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("momentum, nesterov", [(False, False), (True, False), (True, True)])
def test_sgd_vjp_without_g_where_it_does_not_read_it(momentum: bool, nesterov: bool, maximize: bool) -> None:
    """For every set of cotangents asked for that SGD's ``reads_grad`` says reads no G, its
    VJP given g = None is bit for bit the one given G: on the first step (no buffer yet)
    and after, with the buffer read from ``after=`` and recomputed."""
    import itertools
    from gimli.optim import sgd
    p, g, buf, P, Sb, hp = _sgd_point(11, 5, nesterov)
    flags = sgd.Flags(momentum, nesterov, maximize)
    skipped = 0
    for size in range(len(sgd.HYPERS) + 1):
        for need in map(frozenset, itertools.combinations(sgd.HYPERS, size)):
            if sgd.reads_grad(flags, need):
                continue
            for first, read_after in itertools.product([False, True], repeat=2):
                state = sgd.State(None if first or not momentum else buf)
                after = sgd.step(flags, p, state, g, hp)[1] if read_after else None
                S = sgd.State(Sb if momentum else None)
                want = sgd.vjp(flags, p, state, g, hp, P, S, need, after=after)
                got = sgd.vjp(flags, p, state, None, hp, P, S, need, after=after)    # type: ignore[arg-type]
                assert torch.equal(got.params, want.params) and torch.equal(got.grads, want.grads)
                assert (got.state.momentum_buffer is None) == (want.state.momentum_buffer is None)
                assert got.state.momentum_buffer is None or torch.equal(got.state.momentum_buffer,
                                                                        want.state.momentum_buffer)
                assert got.hypers.keys() == want.hypers.keys() == need
                for name in need:
                    a, b = got.hypers[name], want.hypers[name]
                    assert (a is None and b is None) or torch.equal(a, b), name
                skipped += 1
    assert skipped == 2 * 4                                 # ∅ and {λ}, each in 4 cases


def test_a_flat_sgd_call_joins_no_g_its_vjp_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """θ₀ learned through plain SGD (MAML: no hyperparameter's cotangent asked for): the
    sweep joins no G_j for the optimizer's VJP, one concatenation a step fewer than a
    rule that reads G, and the hypergradient is the same bits, and the autograd unroll's."""
    from gimli.optim import sgd
    J = 4
    count, got, want = _counted("SGD", J=J, init=True)
    monkeypatch.setitem(SUPPORTED, torch.optim.SGD, dataclasses.replace(sgd.RULE, reads_grad=None))
    joined, as_before, _ = _counted("SGD", J=J, init=True)
    assert joined.ops["aten.cat.default"] - count.ops["aten.cat.default"] == J
    assert got.keys() == as_before.keys() and all(k.startswith("init.") for k in got)
    assert all(torch.equal(got[k], as_before[k]) for k in got)
    for k in got:
        assert (got[k] - want[k]).abs().max() <= 1e-9 * want[k].abs().max(), k


_DECAYING = ["SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adagrad", "Adadelta", "Adamax", "RMSprop", "ASGD"]


def _counted(name: str, *, J: int = 4, lr: Any = "scalar", heads: bool = False, init: bool = False,
             **kwargs: Any) -> tuple[OpCount, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The operations of one hypergradient of a J-step unroll whose lr is learned (at
    granularity ``lr``; with ``init``, θ₀ instead, as MAML), with that hypergradient and the
    autograd unroll's. ``heads``: a model whose second head is read on every third step only."""
    torch.manual_seed(6)
    model = (_TwoHeads() if heads else nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))).double()
    opt = getattr(torch.optim, name)(model.parameters(), lr=0.05, **kwargs)
    loss = _head_loss if heads else (lambda m, b, meta: F.mse_loss(m(b[0]), b[1]))
    meta = gimli.MetaParams(opt, init=model) if init else gimli.MetaParams(opt, {"lr": lr})
    solver = gimli.GimliSolver(model, loss, opt, meta)
    data = [(x, y, "b" if j % 3 == 2 else "a") if heads else (x, y)
            for j, (x, y) in enumerate(regression_batches(7, 3, 1, J + 1))]
    solver.hypergradient(data[:J], data[J])
    with OpCount() as count:
        got = solver.hypergradient(data[:J], data[J])
    return count, got, gimli.full_unroll_hypergradient(solver, data[:J], data[J])


def _ops_and_hypergradient(name: str, **kwargs: Any) -> tuple[int, dict[str, torch.Tensor],
                                                             dict[str, torch.Tensor]]:
    """:func:`_counted`'s number of operations, hypergradient and the unroll's."""
    count, got, want = _counted(name, **kwargs)
    return count.total(), got, want


@pytest.mark.parametrize("name", _DECAYING)
def test_a_weight_decay_of_zero_costs_no_op(name: str) -> None:
    """A param group's weight decay of 0 (not learned) is skipped in the step and in its
    VJP, as torch.optim skips it: at least four operations a step fewer than a weight
    decay of 1e-3 (λθ and its add in the step, their cotangent and its add in the VJP),
    and the hypergradient still that of the autograd unroll."""
    skipped, got, want = _ops_and_hypergradient(name, weight_decay=0.0)
    computed, _, _ = _ops_and_hypergradient(name, weight_decay=1e-3)
    assert computed - skipped >= 4 * 4                  # (4 steps)
    assert torch.allclose(got["hypers.lr"], want["hypers.lr"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_a_weight_decay_learned_from_zero_is_not_skipped(name: str) -> None:
    """A weight decay of 0 that is a meta-parameter is a learned value, not the constant
    0: its terms stay, and its hypergradient is the real loop's (finite differences)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    data = regression_batches(9, 3, 1, 5)
    train, val = data[:4], data[4]

    def val_after(wd: float) -> float:
        twin = copy.deepcopy(model)
        opt = getattr(torch.optim, name)(twin.parameters(), lr=0.05, weight_decay=wd)
        for x, y in train:
            opt.zero_grad()
            F.mse_loss(twin(x), y).backward()
            opt.step()
        with torch.no_grad():
            return float(F.mse_loss(twin(val[0]), val[1]))

    opt = getattr(torch.optim, name)(model.parameters(), lr=0.05, weight_decay=0.0)
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt,
                               gimli.MetaParams(opt, ["weight_decay"]))
    hg = float(solver.hypergradient(train, val)["hypers.weight_decay"])
    h = 1e-5                                            # one-sided (torch.optim refuses λ < 0), O(h²)
    fd = (-3 * val_after(0.0) + 4 * val_after(h) - val_after(2 * h)) / (2 * h)
    assert hg != 0 and abs(hg - fd) <= 1e-6 * abs(fd)
    full = float(gimli.full_unroll_hypergradient(solver, train, val)["hypers.weight_decay"])
    assert abs(hg - full) <= 1e-10 * abs(full)


_READS_AFTER = [row for row in OPTIM_DB if importlib.import_module(f"gimli.optim.{BUILTIN[row.name]}").RULE.reads_after]


@pytest.mark.parametrize("row", _READS_AFTER, ids=[row.name for row in _READS_AFTER])
@given(data=st.data())
def test_reading_the_state_the_step_produced_changes_no_bit(row: OptimRow, data: st.DataObject) -> None:
    """Every rule that reads σ_{j+1} (``Rule.reads_after``) gives the hypergradient it
    gives when it recomputes the new state instead, bit for bit: random flags, settings,
    a state from earlier real steps, and meta-parameters (all learnable ones among them,
    so every cotangent that reads the new state is formed)."""
    problem, kwargs, _ = data.draw(problems(row))
    choice = data.draw(meta_choices(row, kwargs, problem.opt))
    rule = SUPPORTED[row.cls]
    got = build(problem, choice, kwargs.get("maximize", False)).hypergradient(problem.train, problem.val)
    object.__setattr__(rule, "reads_after", False)          # (a frozen dataclass: for this test only)
    try:
        want = build(problem, choice, kwargs.get("maximize", False)).hypergradient(problem.train, problem.val)
    finally:
        object.__setattr__(rule, "reads_after", True)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _ops_with(name: str, floats: bool, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[int, float, float]:
    """:func:`_ops_and_hypergradient` with the rule's ``floats`` as built, or none."""
    cls = getattr(torch.optim, name)
    if not floats:
        monkeypatch.setitem(SUPPORTED, cls, dataclasses.replace(SUPPORTED[cls], floats=()))
    ops, got, want = _ops_and_hypergradient(name, **kwargs)
    monkeypatch.undo()
    return ops, float(got["hypers.lr"]), float(want["hypers.lr"])


@pytest.mark.parametrize("name, kwargs, fewer", [
    # β₁^t, 1 − β₁^t, β₂^t, 1 − β₂^t and √c₂ in the step, the same five in the VJP
    ("Adam", {"betas": (0.8, 0.95)}, 10),
    ("AdamW", {}, 10),
    ("SGD", {"momentum": 0.9, "dampening": 0.1}, 1),    # 1 − τ in the step
])
def test_a_param_groups_number_reaches_the_rule_as_a_float(name: str, kwargs: dict[str, Any], fewer: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """β₁, β₂, ε (Adam) and the momentum and dampening (SGD) that a param group holds and
    no meta-parameter learns reach the rule as Python floats (``Rule.floats``), as
    torch.optim keeps them: the bias corrections and 1 − β cost no tensor operation,
    and the hypergradient is still the autograd unroll's."""
    as_tensors, _, _ = _ops_with(name, False, monkeypatch, **kwargs)
    as_floats, got, want = _ops_with(name, True, monkeypatch, **kwargs)
    assert as_tensors - as_floats >= fewer * 4                      # (4 steps)
    assert got != 0 and abs(got - want) <= 1e-10 * abs(want)


@pytest.mark.parametrize("hyper", ["beta1", "beta2", "eps"])
def test_a_learned_number_is_not_taken_as_a_float(hyper: str) -> None:
    """A hyperparameter that a meta-parameter learns stays a tensor with its cotangent,
    though its value is the param group's number: its hypergradient is the autograd
    unroll's."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt,
                               gimli.MetaParams(opt, [hyper]))
    data = regression_batches(8, 3, 1, 5)
    got = float(solver.hypergradient(data[:4], data[4])[f"hypers.{hyper}"])
    want = float(gimli.full_unroll_hypergradient(solver, data[:4], data[4])[f"hypers.{hyper}"])
    assert got != 0 and abs(got - want) <= 1e-10 * abs(want)


def _sums_and_hypergradient(J: int, skip_odd: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
    """aten.sum calls in one hypergradient of per-tensor Adam lrs over J steps, with that
    hypergradient and the autograd unroll's. ``skip_odd``: a parameter that the loss
    reads only on even steps (no gradient, so no step, on odd ones)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
            self.shift = nn.Parameter(torch.full((1,), 0.3))

        def forward(self, x: torch.Tensor, shifted: bool) -> torch.Tensor:
            out = self.body(x)
            return out + self.shift if shifted else out

    torch.manual_seed(6)
    model = Net().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = [(x, y, not skip_odd or j % 2 == 0) for j, (x, y) in enumerate(regression_batches(7, 3, 1, J + 1))]
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0], b[2]), b[1]), opt,
                               gimli.MetaParams(opt, {"lr": "tensor"}))
    solver.hypergradient(data[:J], data[J])
    with OpCount() as count:
        got = solver.hypergradient(data[:J], data[J])["hypers.lr"]
    want = gimli.full_unroll_hypergradient(solver, data[:J], data[J])["hypers.lr"]
    return count.ops["aten.sum.default"], got, want


def test_a_per_tensor_cotangent_is_summed_once_not_once_a_step() -> None:
    """An lr that is one number per tensor gets its cotangent per element from the VJP;
    the sweep adds those over the steps and sums per tensor once, at the end (the five
    tensors' five sums, whatever J), and the hypergradient is the autograd unroll's."""
    short, got_short, want_short = _sums_and_hypergradient(3)
    long, got, want = _sums_and_hypergradient(6)
    assert short == long == 5
    for a, b in ((got_short, want_short), (got, want)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14) and a.abs().min() > 0


def test_a_tensor_without_a_gradient_at_some_steps_keeps_its_per_tensor_sums() -> None:
    """On odd steps one tensor has no gradient, so the steps run in calls of different
    tensors: the per-element totals are summed per tensor where the layout changes, and
    the hypergradient is still the autograd unroll's."""
    _, got, want = _sums_and_hypergradient(5, skip_odd=True)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14) and got.abs().min() > 0


def _views_and_hypergradient(name: str, flat: bool, monkeypatch: pytest.MonkeyPatch, J: int = 4,
                             heads: bool = False, **kwargs: Any
                             ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """as_strided views cut in :func:`_counted`'s hypergradient (one lr per tensor), with it
    and the unroll's; ``flat=False``: the sweep takes b_j and S_j as lists."""
    orig = gimli.optim.InnerOptimizer.vjp
    if not flat:
        monkeypatch.setattr(gimli.optim.InnerOptimizer, "vjp",
                            lambda self, *a, **k: orig(self, *a, **{**k, "flat": False}))
    count, got, want = _counted(name, J=J, lr="tensor", heads=heads, **kwargs)
    monkeypatch.undo()
    return count.ops["aten.as_strided.default"], got, want


@pytest.mark.parametrize("name, kwargs, fields", [
    ("Adam", {}, 2),                                  # m̄ and v̄
    ("Adam", {"amsgrad": True}, 3),                   # and the running maximum's
    ("SGD", {"momentum": 0.9}, 1),                    # the buffer's (none at step 0)
    ("SGD", {}, 0),
])
def test_the_sweep_passes_cotangents_flat_from_step_to_step(name: str, kwargs: dict[str, Any], fields: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """b_j and each tensor-shaped S_j go from one sweep step's VJP to the next one's as
    the flat tensors the rule computed (``Flat``), not cut into per-tensor views and
    joined again: (1 + fields)·k views a step fewer (SGD's S_0 aside: step 0 has no
    buffer), less B_0's k views cut at the end; and not one bit of the hypergradient
    changes."""
    J, k = 4, 4
    flat_views, got, want = _views_and_hypergradient(name, True, monkeypatch, J, **kwargs)
    list_views, as_lists, _ = _views_and_hypergradient(name, False, monkeypatch, J, **kwargs)
    assert list_views - flat_views == (1 + fields) * k * J - (k if name == "SGD" and fields else 0) - k
    assert got.keys() == as_lists.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], as_lists[key]), key
        assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-14), key


@pytest.mark.parametrize("name, kwargs", [("SGD", {"momentum": 0.9}), ("Adam", {})])
def test_flat_cotangents_meet_steps_of_other_tensors(name: str, kwargs: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the calls change from step to step (a head without a gradient on two steps
    of three), a flat b_j or S_j reaches a step of several calls, which takes them as
    lists: the hypergradient is bit for bit the one of lists throughout, and the autograd
    unroll's."""
    _, got, want = _views_and_hypergradient(name, True, monkeypatch, 7, heads=True, **kwargs)
    _, as_lists, _ = _views_and_hypergradient(name, False, monkeypatch, 7, heads=True, **kwargs)
    for key in want:
        assert torch.equal(got[key], as_lists[key]), key
        assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-14) and got[key].abs().max() > 0, key
