"""Memory modes, truncation and first order.

Oracles: the retain mode itself, bit for bit (recomputed steps must reproduce
the forward values exactly); the full autograd unroll, with the matching
stop-gradients for ``first_order`` and ``truncate``; closed forms for
first-order MAML and one-step truncation under plain SGD; and, for the number
of recomputed steps, a brute-force search over every checkpoint placement next
to revolve's closed form.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gimli
from gimli._revolve import forward_steps
from optim_db import IDS, OPTIM_DB, OptimRow
from strategies import meta_choices, mlp, mse, problems, regression_batches
from test_sweep import assert_hypergradients_close, build

# the properties cover setups whose hypergradient is identically zero (a truncated θ₀,
# Rprop's φ^loss); gimli warns of those (tests/test_diagnostics.py), not an error here
pytestmark = pytest.mark.filterwarnings("ignore::gimli.GimliWarning")

MODES = [dict(memory="recompute"), dict(memory="budget", snapshots=1),
         dict(memory="budget", snapshots=2), dict(memory="budget", snapshots=3)]


def solver_like(solver: gimli.GimliSolver, **kw: Any) -> gimli.GimliSolver:
    p = solver.problem
    return gimli.GimliSolver(p.module, p.loss_fn, p.inner.torch_optimizer, solver.meta,
                             val_loss_fn=p.val_loss_fn, **kw)


@pytest.mark.parametrize("row", OPTIM_DB, ids=IDS)
@given(data=st.data(), mode=st.sampled_from(MODES))
def test_memory_modes_equal_retain_bit_for_bit(row: OptimRow, data: st.DataObject,
                                               mode: dict[str, Any]) -> None:
    problem, kwargs, _ = data.draw(problems(row))
    choice = data.draw(meta_choices(row, kwargs, problem.opt))
    retain = build(problem, choice, kwargs.get("maximize", False))
    try:
        expected = retain.hypergradient(problem.train, problem.val)
    except FloatingPointError:                  # a diverging unroll: nothing to compare
        return
    got = solver_like(retain, **mode).hypergradient(problem.train, problem.val)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class Counter(nn.Module):
    """A buffer read and updated by every forward call (as a running statistic is):
    a step replayed with the buffer as a later step left it computes another G_j."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * (1 + 0.1 * self.calls)


class Noisy(nn.Module):
    """Dropout, BatchNorm and a counting buffer in train mode: recomputation must
    replay all three exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3),
                                 Counter(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_dropout_and_batchnorm_replay_exactly(mode: dict[str, Any]) -> None:
    def run(**kw: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = Noisy().double()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        meta = gimli.MetaParams(opt, {"lr": "tensor", "beta1": "scalar"}, init=model)
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, **kw)
        batches = regression_batches(0, 3, 1, 7, size=8)
        torch.manual_seed(1)
        hg = solver.hypergradient(batches[:6], batches[6])
        after = torch.rand(4, dtype=torch.float64)     # the generator continues the same way
        return hg, after, {n: b.clone() for n, b in model.named_buffers()}

    (want, rng_want, buf_want), (got, rng_got, buf_got) = run(), run(**mode)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(rng_got, rng_want)
    assert all(torch.equal(buf_got[n], buf_want[n]) for n in buf_want)


@lru_cache(maxsize=None)
def brute_force(n: int, free: int) -> int:
    """The fewest forward steps reversing n steps with the start held and ``free``
    more snapshots, by trying every placement of the next one."""
    if n == 1:
        return 0
    if free == 0:
        return n * (n - 1) // 2
    return min(m + brute_force(n - m, free - 1) + brute_force(m, free) for m in range(1, n))


@pytest.mark.parametrize("steps,snapshots", [(1, 1), (4, 1), (6, 2), (9, 2), (12, 3), (20, 3),
                                             (20, 21), (30, 4)])
def test_budget_recomputation_count_is_revolves_optimum(steps: int, snapshots: int) -> None:
    """J optimizer steps plus the validation point make a chain of J + 1 points; the
    forward steps of a budget-mode hypergradient are t(J + 1, s)."""
    assert forward_steps(steps + 1, snapshots) == brute_force(steps + 1, snapshots - 1)
    torch.manual_seed(0)
    model = mlp([2, 3, 1], "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta,
                               memory="budget", snapshots=snapshots)
    batches = regression_batches(0, 2, 1, steps + 1)
    got = solver.hypergradient(batches[:steps], batches[steps])
    assert solver.last_forward_steps == forward_steps(steps + 1, snapshots)
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, batches[:steps],
                                                                     batches[steps]))
    if snapshots > steps:                       # everything fits: no recomputation at all
        assert solver.last_forward_steps == steps


@pytest.mark.parametrize("row", OPTIM_DB, ids=IDS)
@given(data=st.data(), first_order=st.booleans(), truncate=st.one_of(st.none(), st.integers(1, 4)),
       memory=st.sampled_from(["retain", "recompute"]))
def test_first_order_and_truncation_match_their_oracles(row: OptimRow, data: st.DataObject,
                                                        first_order: bool, truncate: int | None,
                                                        memory: str) -> None:
    problem, kwargs, _ = data.draw(problems(row))
    choice = data.draw(meta_choices(row, kwargs, problem.opt))
    solver = solver_like(build(problem, choice, kwargs.get("maximize", False)), first_order=first_order,
                         truncate=truncate, memory=memory)
    try:
        ref = gimli.full_unroll_hypergradient(solver, problem.train, problem.val)
    except FloatingPointError:
        return
    if not all(torch.isfinite(r).all() for r in ref.values()):
        return                                  # √0 in autograd (test_adam_dead_units.py)
    assert_hypergradients_close(solver.hypergradient(problem.train, problem.val), ref)


def test_first_order_maml_is_the_final_gradient() -> None:
    """Plain SGD, first order: B_j = B_{j+1}, so θ₀'s hypergradient is ∇L^val(θ_J)."""
    torch.manual_seed(0)
    model = mlp([2, 5, 1], "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = gimli.MetaParams(init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, first_order=True)
    batches = regression_batches(0, 2, 1, 5)
    got = solver.hypergradient(batches[:4], batches[4])
    trained = mlp([2, 5, 1], "tanh")
    trained.load_state_dict(model.state_dict())
    real = torch.optim.SGD(trained.parameters(), lr=0.1)
    for batch in batches[:4]:
        real.zero_grad()
        mse(trained, batch).backward()
        real.step()
    final = torch.autograd.grad(mse(trained, batches[4]), list(trained.parameters()))
    for (name, _), g in zip(model.named_parameters(), final):
        torch.testing.assert_close(got[f"init.{name}"], g, rtol=1e-12, atol=1e-15)


def test_truncate_one_step_is_the_last_step_only() -> None:
    """Plain SGD, truncate=1: dL/dlr = −∇L^val(θ_J)·G_{J−1}, and θ₀'s path is cut."""
    torch.manual_seed(0)
    model = mlp([2, 5, 1], "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, truncate=1)
    batches = regression_batches(0, 2, 1, 5)
    got = solver.hypergradient(batches[:4], batches[4])
    real = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in batches[:3]:
        real.zero_grad()
        mse(model, batch).backward()
        real.step()
    last = torch.autograd.grad(mse(model, batches[3]), list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), last):
            p -= 0.1 * g
    final = torch.autograd.grad(mse(model, batches[4]), list(model.parameters()))
    expected = -sum((f * g).sum() for f, g in zip(final, last))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    torch.testing.assert_close(got["hypers.lr"], expected, rtol=1e-12, atol=0.0)
    assert all(torch.all(got[k] == 0) for k in got if k.startswith("init."))


def test_bad_memory_settings() -> None:
    model = mlp([2, 1], "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = gimli.MetaParams(init=model)
    for kw, match in [(dict(memory="tape"), "memory must be"), (dict(memory="budget"), "snapshots"),
                      (dict(snapshots=2), "snapshots"), (dict(memory="budget", snapshots=0), "≥ 1"),
                      (dict(truncate=0), "truncate")]:
        with pytest.raises(ValueError, match=match):
            gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, **kw)


def test_repeated_steps_hold_no_tensors() -> None:
    """No growth across step() calls: the live tensors after 40 meta-steps are those
    after the first (nothing of an unroll outlives it)."""
    import gc
    import warnings

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():     # isinstance() on torch's deprecated aliases warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    torch.manual_seed(0)
    model = mlp([2, 8, 1], "tanh")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    meta = gimli.MetaParams(opt, {"lr": "tensor"}, loss={"l2": torch.tensor(0.01, dtype=torch.float64)},
                            init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b) + meta["l2"] * sum(
        (p ** 2).sum() for p in m.parameters()), opt, meta, val_loss_fn=mse,
        meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-3), memory="recompute")
    batches = regression_batches(0, 2, 1, 6)
    solver.step(batches[:5], batches[5])
    before = live_tensors()
    for _ in range(40):
        solver.step(batches[:5], batches[5])
    assert live_tensors() == before


def test_recompute_points_are_copies_in_shared_blocks_freed_as_the_sweep_passes(monkeypatch: Any) -> None:
    """recompute's held points (Points): a laid-out field is copied into a row of a block
    shared by several points (so a later change to the step's own tensor does not reach
    it), a field of another dtype gets its own blocks, a field that is not laid out is held
    as it is, each popped point has the values it was given, aligned as a new tensor is,
    and a block is freed once the sweep has popped every point in it."""
    import weakref
    from typing import NamedTuple

    from gimli._unroll import Point, Points
    from gimli.optim._rule import Laid, Segments

    class State(NamedTuple):
        buffer: list[torch.Tensor]
        count: list[int]

    shapes = [(12, 8), (4,)]                    # 400 bytes in float32, 800 in float64
    seg = Segments([torch.zeros(s) for s in shapes])
    monkeypatch.setattr(Points, "CHUNK", 3 * Points.ALIGN)        # three float32 rows a block
    torch.manual_seed(0)
    points, given = Points(7), []
    for j in range(7):
        theta = seg.split(torch.randn(seg.total)) if j else [torch.randn(s) for s in shapes]
        buffer = Segments([torch.zeros(s, dtype=torch.float64) for s in shapes]).split(
            torch.randn(seg.total, dtype=torch.float64))
        point = Point(theta, State(buffer, [j, j]), {}, (j > 0,) * 2)
        given.append(Point([t.clone() for t in theta], State([b.clone() for b in buffer], [j, j]), {},
                           point.stepped))
        points.append(point)
        if j:
            assert isinstance(theta, Laid) and theta.flat is not None
            theta.flat.add_(1.0)                # the step's own tensor changes: the held copy does not
    assert type(points._held[0][0]) is list                   # the start (not laid out): as it is
    blocks = [weakref.ref(points._held[j][0].block) for j in (1, 4)]           # θ: points 1–3, 4–6
    assert points._held[1][0].block is points._held[3][0].block is not points._held[4][0].block
    assert points._held[1][2][0].block is not points._held[2][2][0].block     # float64: one row a block
    for j in reversed(range(7)):
        got = points.pop()
        assert got.stepped == given[j].stepped and got.state.count == [j, j]
        for a, b in zip(list(got.theta) + list(got.state.buffer), given[j].theta + given[j].state.buffer):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        # a row starts where a new tensor would (a product may sum in another order elsewhere)
        assert got.theta[0].data_ptr() % 64 == 0 and got.state.buffer[0].data_ptr() % 64 == 0
        if j == 3:                      # (got: point 3, whose block holds points 1–3)
            assert blocks[1]() is None and blocks[0]() is not None


def test_recompute_equals_retain_bit_for_bit_in_float32() -> None:
    """A float32 MLP whose layers' sizes put its tensors at offsets that are not multiples
    of 64 bytes in a flat point (1-40-40-1, 1,761 weights): a recomputed step must read
    each held point at the alignment a new tensor has, or a matrix product sums in another
    order (3·10⁻⁷ apart at J = 80 when the held rows were packed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    x = torch.rand(10, 1) * 10 - 5
    batches = [(x, torch.sin(x))] * 20
    results = []
    for memory in ("retain", "recompute"):
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b),
                                   torch.optim.SGD(model.parameters(), lr=0.01),
                                   gimli.MetaParams(init=model), val_loss_fn=mse, memory=memory)
        results.append(solver.hypergradient(batches, batches[0]))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
