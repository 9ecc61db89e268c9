"""The forward unroll, Algorithm 1 lines 3–7, under three memory modes.

Each θ'_j is a fresh leaf; G_j's graph reaches back only to θ'_j and φ^loss.
The optimizer step runs on detached values, so no graph spans two steps: the
whole dependency across steps is carried by the hand-written sweep, which asks
for the steps in reverse order (``Unroll.reversed``):

* ``retain`` (the paper's line 5): G_j's graph is kept from the forward pass;
* ``recompute``: the forward pass keeps only (θ'_j, σ_j, buffers) per step and
  no graph; the sweep rebuilds G_j's graph one step at a time;
* ``budget``: at most ``snapshots`` points (θ'_j, σ_j, buffers) are held at
  once; the others are recomputed from the nearest one on the binomial
  (revolve) schedule, whose number of forward steps is optimal (``_revolve.py``).

A recomputed step replays the random-number state it first ran with (dropout
draws the same mask) and starts from its own copy of the buffers (BatchNorm's
running statistics are updated once, as in the forward pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._problem import NonFiniteError, Problem, values_only
from ._revolve import split
from .optim._rule import Laid, Segments, laid_like

Hypers = dict[str, list[Tensor]]


class Point(NamedTuple):
    """The unroll at step j: θ'_j (detached), σ_j, the buffers, and which tensors have
    stepped so far (had a gradient G_i, i < j: torch.optim then keeps state for them)."""

    theta: list[Tensor]
    state: Any
    buffers: dict[str, Tensor]
    stepped: tuple[bool, ...]


class Points:
    """The points recompute mode holds for the sweep (one per step). A laid-out field of a
    point (θ'_j, or a state field: a :class:`~gimli.optim._rule.Laid` list) smaller than
    :attr:`CHUNK` is copied into a row of a tensor of about ``CHUNK`` bytes that holds the
    field for several points (freed when the sweep has passed all of them); a larger one is
    held as its flat tensor, without its views; and a field that is not laid out (the
    model's own tensors at the start, a state of per-tensor numbers, an unroll whose calls
    split) as it is.

    What the rows save is the allocator's: J small points are J blocks and some 14 small
    per-tensor objects each (views, their autograd metadata), allocated between each step's
    temporaries, so that the heap below them could not be returned (2 MB on a 0.17 MB-per-
    point MLP at J = 80: more than a tenth of what the points themselves hold). Blocks of
    about ``CHUNK`` bytes, one size from one unroll to the next, are reused by the allocator
    from call to call, where one block for all J points would be mapped, and written for
    the first time, on every call."""

    CHUNK = 1 << 20
    # each row starts as a new tensor would (CPU: 64 bytes; CUDA: 512): a matrix product
    # may sum in another order at another alignment, and a recomputed step must give the
    # bits the first run gave
    ALIGN = 512

    def __init__(self, count: int):
        self.count = count
        self._open: dict[Any, tuple[Tensor, int]] = {}  # field → its block being filled, rows used
        self._held: list[tuple[Any, ...]] = []

    def _put(self, field: Any, values: Any) -> Any:
        flat = values.flat if isinstance(values, Laid) else None
        seg = values.seg if flat is not None else None
        if flat is None or seg is None or len(values) != seg.k or flat.dim() != 1 or \
                flat.shape[0] != seg.total or not flat.is_contiguous():
            return values
        size = flat.numel() * flat.element_size()
        if size >= self.CHUNK:
            return _Row(flat, None, seg)
        width = -(-size // self.ALIGN) * self.ALIGN // flat.element_size()    # a row's elements
        block, used = self._open.get(field, (None, 0))
        if block is None or used == block.shape[0] or block.shape[1] != width or \
                block.dtype != flat.dtype or block.device != flat.device:
            rows = min(self.CHUNK // (width * flat.element_size()), self.count - len(self._held))
            block, used = flat.new_empty((rows, width)), 0
        block[used, :seg.total].copy_(flat)
        self._open[field] = (block, used + 1)
        return _Row(block, used, seg)

    def append(self, point: Point) -> None:
        self._held.append((self._put("theta", point.theta), type(point.state),
                           [self._put(f, values) if isinstance(values, list) else values
                            for f, values in enumerate(point.state)], point.buffers, point.stepped))

    def pop(self) -> Point:
        self._open.clear()          # (the sweep has begun: a block lives while a point in it is held)
        theta, state_type, state, buffers, stepped = self._held.pop()

        def get(values: Any) -> Any:
            if not isinstance(values, _Row):
                return values
            if values.row is None:
                return values.seg.split(values.block)
            return values.seg.split(values.block[values.row, :values.seg.total])

        return Point(get(theta), state_type(*(get(values) for values in state)), buffers, stepped)


class _Row(NamedTuple):
    block: Tensor           # the rows of a field of several points (or one point's flat tensor)
    row: int | None         # this point's (None: the flat tensor itself)
    seg: Segments           # how the point's tensors lie in its row


class Step(NamedTuple):
    """Step j as the sweep needs it: θ'_j as leaves, σ_j, G_j with its graph (and, for
    forward mode, ∇ℓ_j w.r.t. each φ^loss leaf with its graph)."""

    j: int
    theta: list[Tensor]
    state: Any
    grads: list[Tensor | None]
    leaf_grads: list[Tensor | None] = []


class RngTape:
    """Each step's random-number state, recorded on first run and replayed after. With
    ``every=False`` (an unroll that runs each step once, in order) only step 0's is kept:
    enough to replay the steps in order from the start (Unroll.check)."""

    def __init__(self, devices: set[torch.device], every: bool = True):
        self.cuda = any(d.type == "cuda" for d in devices) and torch.cuda.is_available()
        self.every = every
        self.saved: dict[int | str, Any] = {}

    def _get(self) -> Any:
        return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.cuda else None)

    def _set(self, rng: Any) -> None:
        torch.set_rng_state(rng[0])
        if self.cuda:
            torch.cuda.set_rng_state_all(rng[1])

    def enter(self, j: int) -> None:
        if j in self.saved:
            self._set(self.saved[j])
            return
        if not self.every and j > 0:
            return
        rng = self._get()
        last = self.saved.get(j - 1)
        if last is not None and _same_rng(last, rng):
            rng = last              # a step that drew no random numbers: hold one copy, not J
        self.saved[j] = rng

    def mark_end(self) -> None:
        """The state after the forward pass and L^val: where a plain unroll leaves it."""
        self.saved["end"] = self._get()

    def restore_end(self) -> None:
        if "end" in self.saved:
            self._set(self.saved["end"])


def _summary(hypers: Hypers) -> str:
    """Each hyperparameter's range over the tensors, for an error message."""
    out = []
    for name, values in hypers.items():
        present = [v for v in values if v is not None]      # (several optimizers: theirs)
        lo = min(float(v.min()) for v in present)
        hi = max(float(v.max()) for v in present)
        out.append(f"{name}={lo:.4g}" if lo == hi else f"{name}∈[{lo:.4g}, {hi:.4g}]")
    return ", ".join(out)


def _nonfinite(grads: list[Tensor | None]) -> int | None:
    """The index of the first gradient with an inf or NaN entry, or None: one foreach
    max-norm over the list (finite entries never overflow it) and one sync."""
    present = [(i, g.detach()) for i, g in enumerate(grads) if g is not None]
    if not present:
        return None
    where = present[0][1].device
    finite = torch.stack([torch.isfinite(n).to(where)                  # (any dtype, any device)
                          for n in torch._foreach_norm([g for _, g in present], float("inf"))])
    if bool(finite.all()):
        return None
    return present[int((~finite).nonzero()[0])][0]


def _finite_batch(batch: Any) -> bool:
    """Whether every floating-point tensor in a batch (nested tuples, lists, dicts) is finite."""
    if isinstance(batch, Tensor):
        return not batch.is_floating_point() or bool(torch.isfinite(batch).all())
    if isinstance(batch, (list, tuple)):
        return all(_finite_batch(b) for b in batch)
    if isinstance(batch, dict):
        return all(_finite_batch(b) for b in batch.values())
    return True


def describe_batch(batch: Any) -> str:
    """A batch's structure, for an error message."""
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (list, tuple)):
        inner = ", ".join(describe_batch(b) for b in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"a {type(batch).__name__} of {len(batch)} ({inner})"
    return f"a {type(batch).__name__}"


def add_note(error: BaseException, note: str) -> None:
    """Attach a note to an exception (shown under its message, Python ≥ 3.11)."""
    add = getattr(error, "add_note", None)
    if add is not None:
        add(note)


def _same_rng(a: Any, b: Any) -> bool:
    if not torch.equal(a[0], b[0]):
        return False
    return a[1] is None or all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


class Unroll:
    """A J-step unroll from the model's weights and the optimizer's state (line 3).

    Whether each ℓ_j and G_j is finite is read once, after the forward pass
    (:meth:`check`), not step by step, unless ``check_each`` (a caller that runs
    steps on its own, out of order)."""

    def __init__(self, problem: Problem, hypers: Sequence[Hypers], batches: Sequence[Any], *,
                 memory: str = "retain", snapshots: int | None = None, graph: bool = True,
                 truncate: int | None = None, check_each: bool = False,
                 leaves: Sequence[Tensor] = ()):
        self.problem, self.hypers, self.batches = problem, hypers, batches
        self.leaves = list(leaves)      # φ^loss leaves whose ∇ℓ_j each step also keeps
        self.memory, self.snapshots, self.graph = memory, snapshots, graph
        self.J = len(batches)
        self.first = 0 if truncate is None else max(0, self.J - truncate)   # oldest step swept
        self.forward_steps = 0          # optimizer steps evaluated, recomputations included
        self.train_losses: list[float] = [float("nan")] * self.J
        # each step's ℓ_j, held on the device until check() reads them all (and whether θ'_J
        # is finite) with one host sync: a 0-dim tensor a step, copied nowhere in between
        self._losses: list[Tensor] = []
        self._checking = check_each     # a host check per step (or replaying: check())
        self.rng = RngTape({p.device for p in problem.inner.params}, every=memory != "retain")
        self.trained = problem.trained()    # tensors that step (requires_grad, as torch.optim)
        self.start = Point([p.detach().clone() for p in problem.inner.params],   # line 3
                           problem.inner.read_state(), problem.buffers(),
                           (False,) * len(problem.inner.params))

    # --- one step ----------------------------------------------------------------------
    def grads(self, j: int, point: Point, *, graph: bool) -> tuple[Step, dict[str, Tensor]]:
        """G_j at ``point`` (line 5), with its graph if asked, and the buffers as step j
        leaves them (updated in step j's own copy)."""
        self.rng.enter(j)
        theta = laid_like([t.detach().requires_grad_(trained) for t, trained in zip(point.theta, self.trained)],
                          point.theta)      # (θ'_j's flat tensor goes along: the step joins nothing)
        buffers = {n: b.clone() for n, b in point.buffers.items()}
        versions = [t._version for t in theta]
        try:
            loss = self.problem.train_loss(theta, buffers, self.batches[j], checked=self._checking)
        except NonFiniteError as e:
            if not _finite_batch(self.batches[j]):
                raise NonFiniteError(f"{e} at step {j} of the unroll: training batch {j} itself "
                                     f"holds inf or NaN values") from e
            if j == 0:
                raise
            largest = max(float(t.abs().max()) for t in point.theta)
            raise NonFiniteError(
                f"{e} at step {j} of the unroll, after {j} optimizer steps from the model's "
                f"weights, whose gradients were all finite (largest |θ'_{j}| entry: {largest:.3g}): "
                f"if the unroll diverged, check the optimizer's hyperparameters, here "
                f"{_summary(self.hypers[j - 1])}") from e
        except Exception as e:
            add_note(e, f"(raised by loss_fn at inner step {j} of the unroll, on training batch {j}: "
                        f"{describe_batch(self.batches[j])})")
            raise
        if [t._version for t in theta] != versions:
            raise ValueError("loss_fn modified the model's parameters in place (θ'_j); gimli "
                             "evaluates every loss at the unroll's own θ'_j, so loss_fn must only "
                             "read them (use out-of-place operations, e.g. w = w * mask, not w.mul_)")
        found = self.problem.inner_grads(loss, theta, graph=graph, leaves=self.leaves)
        G, leaf_grads = found[:len(theta)], found[len(theta):]
        if not self._checking:
            if len(self._losses) == j:              # first run of step j: checked at check()
                self._losses.append(loss.detach())
            return Step(j, theta, point.state, G, leaf_grads), buffers
        value = loss.item()
        bad = _nonfinite(G)
        if bad is not None:
            raise NonFiniteError(
                f"the gradient G_{j} = ∇_θ ℓ_{j} of loss_fn at step {j} is not finite in "
                f"{self.problem.names[bad]} although the loss is ({value:.6g}): the backward pass "
                f"of loss_fn (or of the model) produces inf or NaN at θ'_{j} — a square root, log "
                f"or division at 0, or a masked branch (torch.where) with an infinite value")
        self.train_losses[j] = value
        return Step(j, theta, point.state, G, leaf_grads), buffers

    def run(self, j: int, point: Point, *, graph: bool) -> tuple[Step, Point]:
        """Step j from ``point``: G_j and the next point (line 6)."""
        step, buffers = self.grads(j, point, graph=graph)
        with values_only():                     # (G_j read as values)
            new_theta, new_state = self.problem.inner.step(point.theta, point.state, step.grads,
                                                           self.hypers[j])
        self.forward_steps += 1
        stepped = tuple(s or g is not None for s, g in zip(point.stepped, step.grads))
        return step, Point(new_theta, new_state, buffers, stepped)

    def advance(self, j: int, point: Point, to: int) -> Point:
        """From step j to step ``to`` without graphs."""
        for k in range(j, to):
            point = self.run(k, point, graph=False)[1]
        return point

    def check(self, final: Point) -> None:
        """Read every step's loss, and raise NonFiniteError if some ℓ_j or G_j was not
        finite: one host sync for the whole unroll. A non-finite G_j makes θ'_{j+1} and
        all later points non-finite (inf or NaN propagates through every update, even
        at lr 0), so the losses and the final point θ'_J tell; the steps are then
        replayed in order from the start with a check each, so that the error names the
        first bad step as a per-step check would have, and says why."""
        if not self._losses:
            return
        device = self._losses[0].device
        stepped = [t.detach() for t, s in zip(final.theta, final.stepped) if s]
        norms = torch._foreach_norm(stepped, float("inf")) if stepped else []
        n = len(self._losses)
        values = torch.cat([torch.stack(self._losses).to(torch.float64)]
                           + [x.to(device, torch.float64).reshape(1) for x in norms]).tolist()
        for j in range(n):
            self.train_losses[j] = values[j]
        if all(math.isfinite(v) for v in values):
            return
        self._checking = True               # raises at the first bad step, if any
        self.rng.enter(0)
        self.advance(0, self.start, n)
        self._checking = False              # none: a tensor was not finite from the start

    # --- the steps in reverse order ------------------------------------------------------
    def reversed(self) -> Iterator[Point | Step]:
        """First the final point J, then Step J−1, …, Step ``first`` (line 10's order)."""
        origin = self.advance(0, self.start, self.first)    # truncated: no need to keep these
        if self.memory == "retain":
            yield from self._retained(origin)
        elif self.memory == "recompute":
            yield from self._recomputed(origin)
        else:                           # "budget" (GimliSolver validates the mode)
            assert self.memory == "budget" and self.snapshots is not None
            yield from self._revolve(self.first, self.J + 1, origin, self.snapshots - 1)
        self.rng.restore_end()

    def _retained(self, point: Point) -> Iterator[Point | Step]:
        steps = []
        for j in range(self.first, self.J):
            step, point = self.run(j, point, graph=self.graph)
            steps.append(step)
        self.check(point)
        yield point
        while steps:
            yield steps.pop()

    def _recomputed(self, point: Point) -> Iterator[Point | Step]:
        points = Points(self.J - self.first)
        for j in range(self.first, self.J):
            points.append(point)
            point = self.run(j, point, graph=False)[1]
        self.check(point)
        yield point
        for j in reversed(range(self.first, self.J)):
            yield self.grads(j, points.pop(), graph=self.graph)[0]

    def _revolve(self, a: int, b: int, point: Point, free: int) -> Iterator[Point | Step]:
        """Reverse points a … b−1 (point J is the validation loss's) with ``point`` = the
        point at a held, and ``free`` more snapshots to place: binomial checkpointing."""
        if b - a == 1:
            if a == self.J:
                self.check(point)
            yield point if a == self.J else self.grads(a, point, graph=self.graph)[0]
            return
        if free == 0:                               # no room: recompute from a each time
            for j in reversed(range(a, b)):
                target = self.advance(a, point, j)
                if j == self.J:
                    self.check(target)
                yield target if j == self.J else self.grads(j, target, graph=self.graph)[0]
            return
        m = a + split(b - a, free)
        held = self.advance(a, point, m)
        yield from self._revolve(m, b, held, free - 1)
        del held
        yield from self._revolve(a, m, point, free)
