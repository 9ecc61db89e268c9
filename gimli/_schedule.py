"""Learning-rate schedules inside the unroll, without advancing the user's scheduler.

Unroll step j uses the hyperparameters the user's scheduler will set at step t+j
(t: where it is now). Two things are needed, each in O(J) per meta-step, never by
replaying the schedule from its start:

**The values.** A *light copy* of the user's (optimizer, scheduler) — deep-copied
with the optimizer's parameters mapped to one empty placeholder and its state to an
empty dict, so that only the param groups and the scheduler are copied — stepped
J − 1 times from where the scheduler is. They are exactly the values the real
scheduler will set (the same code on the same state), for any scheduler that can be
deep-copied, composite ones (SequentialLR, ChainedScheduler, nested) included.
Hyperparameters other than lr that a scheduler changes (OneCycleLR's and CyclicLR's
momentum or β₁) are used as such and cannot be meta-learned with it.

**The derivative with respect to a meta-learned base lr.** A torch schedule is affine
in its base learning rates: scaling every lr-like entry (each scheduler's
``base_lrs``, every group's ``lr``, ``initial_lr``, ``max_lr``, ``min_lr``) by k gives

    lr_t,g(k) = c_t,g + a_t,g·k,                                          (1)

where c collects what is not scaled (``eta_min``, CyclicLR's ``max_lr``). The
solver keeps three *shadows*: light copies whose lr-like entries are k·R_g
(k = 1, 2, 3; R_g the base lrs when it was built), at the user's step count. Each
meta-step steps them by the steps the user's scheduler took since (its commits and
the user's own training), then steps copies of them J − 1 steps ahead:
a = lr(2) − lr(1), c = lr(1) − a, and lr(3) = c + 3a checks (1). A user whose base
lr is B_g (meta-learned: φ_g) sits at k = B_g/R_g, so unroll step j uses

    lr_j,g(φ) = lr_j,g + (a_j,g / R_g)·(φ_g − B_g)                          (2)

with lr_j,g the value above: at φ = B the unroll uses the real scheduler's values
bit for bit, and a/R is the derivative. The shadows are never re-based: they depend
on the step count alone, so following the user costs only the steps taken.

*Consistency.* The user's lr at each step must be c + a·B/R, to within 1e-8 of the
scale of the problem (the base lr, the lr-like entries, the scheduled values, c:
eta_min and the like) — never relative to an lr, which may pass through 0. When it
is not, the optimizer's lr or the scheduler's state was changed outside the
scheduler, and the error says that and what to do.

*Where the shadows start* (when the solver is built with lr meta-learned): a single
scheduler is replayed once from its start on the copies (O(t), once); a composite
one that has not stepped is copied and scaled (at step 0 each child's lr is its base
times a factor); a composite one that has stepped cannot be rewound (its children's
construction steps interleave), so it is refused: build the solver before the first
``step()``. They go into the solver's ``state_dict()`` (scheduler state dicts and
param-group entries: plain data), and are part of a meta-step's transaction.

:func:`rebase` moves the user's scheduler onto the meta-learned base lrs after a
meta-step: every lr-like entry of every scheduler in it set to the k = 1 shadow's
times B_new/R (so a base lr that reached 0 can move up again), and the current lr
set by (2).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .optim import InnerOptimizer

# param-group entries that scale with the base learning rate (OneCycleLR keeps three)
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
SCALES = (1.0, 2.0, 3.0)        # the shadows' k
TOLERANCE = 1e-8                # of the problem's lr scale: what rounding over a long run stays below


class Schedule(NamedTuple):
    """Per unroll step j, each scheduled hyperparameter per tensor as
    value + scale·(v − origin), v its un-scheduled value (for lr: the base lr, or φ
    where meta-learned), eq. (2)."""

    # (None for a tensor no scheduler drives, with several optimizers: v itself)
    value: list[dict[str, list[float | None]]]
    scale: list[dict[str, list[float | None]]]
    origin: dict[str, list[float | None]]

    def at(self, j: int, hp: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        """The hyperparameters of step j."""
        out = dict(hp)
        for name, scale in self.scale[j].items():
            out[name] = [v if c is None or v is None else c + s * (v - o)     # type: ignore[operator]
                         for c, s, v, o in zip(self.value[j][name], scale, hp[name], self.origin[name])]
        return out

    def pull_back(self, j: int, name: str,
                  cotangents: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Cotangents w.r.t. step j's values → w.r.t. the un-scheduled values."""
        if name not in self.scale[j]:
            return list(cotangents)
        return [a if a is None or s is None else s * a for s, a in zip(self.scale[j][name], cotangents)]

    def part(self, start: int, stop: int) -> Schedule:
        """The entries of tensors ``start`` … ``stop − 1``."""
        return Schedule([{n: v[start:stop] for n, v in step.items()} for step in self.value],
                        [{n: v[start:stop] for n, v in step.items()} for step in self.scale],
                        {n: v[start:stop] for n, v in self.origin.items()})


def _joined(pieces: Sequence[tuple[Schedule | None, int]], steps: int) -> Schedule:
    """Several optimizers' schedules (None: no scheduler; ``int``: its tensors) end to end."""
    names = list(dict.fromkeys(n for piece, _ in pieces if piece is not None for n in piece.origin))

    def row(rows: list[dict[str, list[float | None]] | None]) -> dict[str, list[float | None]]:
        out: dict[str, list[float | None]] = {}
        for n in names:
            out[n] = []
            for entries, (_, count) in zip(rows, pieces):
                out[n] += [None] * count if entries is None or n not in entries else entries[n]
        return out

    return Schedule([row([None if p is None else p.value[j] for p, _ in pieces]) for j in range(steps)],
                    [row([None if p is None else p.scale[j] for p, _ in pieces]) for j in range(steps)],
                    row([None if p is None else p.origin for p, _ in pieces]))


def base_lrs(inner: InnerOptimizer, scheduler: Any = None) -> list[float]:
    """The scheduler's base learning rate of each group (what φ^lr replaces); with several
    optimizers, the lr of a group no scheduler drives."""
    if not isinstance(scheduler, Schedulers):
        return [float(group["initial_lr"]) for group in inner.torch_optimizer.param_groups]
    out = []
    for driven, part, _, _ in _pieces(scheduler, inner):
        out += [float(group["initial_lr"] if driven is not None else group["lr"])
                for group in part.torch_optimizer.param_groups]
    return out


# --- several optimizers, each with its own scheduler (or none) ---------------------------------
class Schedulers:
    """The schedulers of several optimizers, one per optimizer (None: it has none), as one
    object: what a commit steps, a transaction and a checkpoint save."""

    def __init__(self, schedulers: Sequence[Any]):
        self.schedulers = list(schedulers)

    def step(self) -> None:
        for scheduler in self.schedulers:
            if scheduler is not None:
                scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [None if s is None else s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            if scheduler is not None:
                scheduler.load_state_dict(saved)


def schedulers(scheduler: Any, optimizers: Sequence[Any]) -> Any:
    """The ``scheduler=`` a solver over several optimizers is given (a list with one entry
    per optimizer, None where it has none; or one scheduler, of one of them) as one
    :class:`Schedulers`; with one optimizer, the scheduler as it is."""
    if len(optimizers) == 1 or scheduler is None or isinstance(scheduler, Schedulers):
        return scheduler
    if isinstance(scheduler, (list, tuple)):
        if len(scheduler) != len(optimizers):
            raise ValueError(f"scheduler= lists {len(scheduler)} schedulers for {len(optimizers)} "
                             f"optimizers: give one per optimizer, in the same order (None for an "
                             f"optimizer without one)")
        for k, (s, opt) in enumerate(zip(scheduler, optimizers)):
            if s is not None and getattr(s, "optimizer", None) is not opt:
                raise ValueError(f"scheduler #{k} of the list drives a different optimizer than "
                                 f"optimizer #{k} ({type(opt).__name__})")
        return Schedulers(scheduler)
    owner = [k for k, opt in enumerate(optimizers) if getattr(scheduler, "optimizer", None) is opt]
    if not owner:
        raise ValueError("the scheduler drives none of the solver's optimizers")
    return Schedulers([scheduler if k == owner[0] else None for k in range(len(optimizers))])


def _pieces(scheduler: Any, inner: InnerOptimizer) -> list[tuple[Any, InnerOptimizer, int, int]]:
    """Per optimizer: (its scheduler or None, its own InnerOptimizer, its first param group,
    its first tensor) in ``inner``."""
    if not isinstance(scheduler, Schedulers):
        return [(scheduler, inner, 0, 0)]
    out, groups, tensors = [], 0, 0
    for s, part in zip(scheduler.schedulers, inner.parts()):
        out.append((s, part, groups, tensors))
        groups += len(part.groups)
        tensors += len(part.params)
    return out


class JointShadows:
    """The shadows of several optimizers' schedulers (None where there are none)."""

    def __init__(self, parts: Sequence[Shadows | None]):
        self.parts = list(parts)

    def snapshot(self) -> list[Any]:
        return [None if p is None else p.snapshot() for p in self.parts]

    def restore(self, saved: list[Any]) -> None:
        for p, s in zip(self.parts, saved):
            if p is not None:
                p.restore(s)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [None if p is None else p.state_dict() for p in self.parts]}


# --- light copies ---------------------------------------------------------------------------
Pair = tuple[torch.optim.Optimizer, Any]        # (optimizer, scheduler), copied together


def _light_copy(opt: torch.optim.Optimizer, scheduler: Any) -> Pair:
    """A deep copy of (optimizer, scheduler) without the parameters and the state: what
    a scheduler reads and writes (the param groups' entries, its own attributes)."""
    placeholder = torch.empty(0)
    memo: dict[int, Any] = {id(opt.state): {}}
    for group in opt.param_groups:
        for p in group["params"]:
            memo[id(p)] = placeholder
        for value in group.values():
            if isinstance(value, nn.Module):        # a learned optimizer's network: shared
                memo[id(value)] = value
    return copy.deepcopy((opt, scheduler), memo)


def _steps(scheduler: Any, n: int) -> None:
    with warnings.catch_warnings():     # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(n):
            scheduler.step()


def _walk(pair: Pair, steps: int, read: Callable[[dict[str, Any]], Any]) -> list[list[Any]]:
    """``read`` of each group at unroll steps 0 … steps−1, stepping ``pair`` (a copy)."""
    opt, scheduler = pair
    out = [[read(group) for group in opt.param_groups]]
    for _ in range(steps - 1):
        _steps(scheduler, 1)
        out.append([read(group) for group in opt.param_groups])
    return out


def _tree(scheduler: Any) -> Iterator[Any]:
    """The scheduler and every scheduler inside it (SequentialLR, ChainedScheduler)."""
    yield scheduler
    for child in getattr(scheduler, "_schedulers", ()):
        yield from _tree(child)


def _position(scheduler: Any) -> int:
    """How many times the scheduler has stepped (a ChainedScheduler steps all its
    children at once and counts as its first)."""
    if hasattr(scheduler, "last_epoch"):
        return int(scheduler.last_epoch)
    children = getattr(scheduler, "_schedulers", None)
    if children:
        return _position(children[0])
    raise TypeError(f"{type(scheduler).__name__} keeps no step count (last_epoch)")


def _times(value: Any, k: float) -> Any:
    return value * k if isinstance(value, Tensor) else float(value) * k


def _scale(pair: Pair, k: float) -> None:
    """Every lr-like entry of the copy times k: eq. (1)'s k."""
    opt, scheduler = pair
    for group in opt.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] = _times(group[key], k)
    for node in _tree(scheduler):
        if hasattr(node, "base_lrs"):
            node.base_lrs = [_times(b, k) for b in node.base_lrs]


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])


# --- the shadows ----------------------------------------------------------------------------
class Shadows:
    """Light copies of the user's (optimizer, scheduler) with every lr-like entry k·R
    (k in SCALES), at the step count ``position``; kept by the solver, eq. (1).
    Copy-on-step: a snapshot is the three references."""

    def __init__(self, reference: list[float], position: int, copies: list[Pair]):
        self.reference, self.position, self.copies = reference, position, copies

    @classmethod
    def start(cls, scheduler: Any, inner: InnerOptimizer) -> Shadows:
        """At the user's step count, R = the current base lrs: a single scheduler replayed
        from its start on the scaled copies; a composite one only before its first step."""
        opt, name = inner.torch_optimizer, type(scheduler).__name__
        reference = base_lrs(inner)
        if any(r == 0 for r in reference):
            raise ValueError(f"{name}'s base lr is 0 in param group {reference.index(0.0)}: a "
                             f"meta-learned lr scales the schedule from it; start it from a "
                             f"positive lr")
        position = _position(scheduler)
        composite = hasattr(scheduler, "_schedulers")
        if composite and position != 0:
            raise ValueError(
                f"{name} has already stepped {position} times: with lr meta-learned, gimli must "
                f"follow a composite scheduler from its first step (the derivative of each step's "
                f"lr w.r.t. the base lr builds up step by step, and its children cannot be "
                f"rewound). Build the GimliSolver right after the scheduler, before its first "
                f"step(); to resume, build it on fresh objects, then load your optimizer's, your "
                f"scheduler's and the solver's state_dict()")
        copies = []
        for k in SCALES:
            pair = _light_copy(opt, scheduler)
            _scale(pair, k)
            if not composite:                           # replayed once from its start
                copy_opt, copy_scheduler = pair
                for group in copy_opt.param_groups:
                    group["lr"] = group["initial_lr"]
                copy_scheduler.last_epoch = -1
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    getattr(copy_scheduler, "_initial_step", copy_scheduler.step)()
                _steps(copy_scheduler, position)
            copies.append(pair)
        return cls(reference, position, copies)

    def follow(self, scheduler: Any, inner: InnerOptimizer) -> None:
        """Step the shadows to where the user's scheduler is now."""
        now = _position(scheduler)
        if now == self.position:
            return
        if now < self.position:
            if not hasattr(scheduler, "_schedulers"):
                self.restore(Shadows.start(scheduler, inner).snapshot())
                return
            raise ValueError(f"{type(scheduler).__name__} is at step {now}, behind step "
                             f"{self.position} where the solver followed it: was it loaded from "
                             f"an older state_dict? Load the solver's state_dict() saved with it "
                             f"too (GimliSolver.load_state_dict)")
        copies = [_light_copy(*pair) for pair in self.copies]
        for _, copy_scheduler in copies:
            _steps(copy_scheduler, now - self.position)
        self.copies, self.position = copies, now

    def ahead(self, steps: int) -> list[list[list[float]]]:
        """lr[k][j][g]: each shadow's lr of each group at unroll steps 0 … steps−1."""
        return [_walk(_light_copy(*pair), steps, _lr) for pair in self.copies]

    # --- transaction and checkpoint ---------------------------------------------------------
    def snapshot(self) -> tuple[list[float], int, list[Pair]]:
        return self.reference, self.position, self.copies

    def restore(self, saved: tuple[list[float], int, list[Pair]]) -> None:
        self.reference, self.position, self.copies = saved

    def state_dict(self) -> dict[str, Any]:
        """Plain data (for ``torch.load(..., weights_only=True)``)."""
        return {"reference": list(self.reference), "position": self.position,
                "shadows": [{"scheduler": copy.deepcopy(scheduler.state_dict()),
                             "param_groups": [{k: copy.deepcopy(v) for k, v in group.items()
                                               if k != "params" and _plain(v)}
                                              for group in opt.param_groups]}
                            for opt, scheduler in self.copies]}

    @staticmethod
    def check_state(state: Any, groups: int) -> None:
        """Raise ``ValueError`` if ``state`` is not a :meth:`state_dict` for ``groups`` groups."""
        ok = isinstance(state, dict) and set(state) == {"reference", "position", "shadows"} \
            and isinstance(state["position"], int) and isinstance(state["reference"], list) \
            and len(state["reference"]) == groups and isinstance(state["shadows"], list) \
            and len(state["shadows"]) == len(SCALES) \
            and all(isinstance(s, dict) and isinstance(s.get("scheduler"), dict)
                    and isinstance(s.get("param_groups"), list) and len(s["param_groups"]) == groups
                    for s in state["shadows"])
        if not ok:
            raise ValueError(f"state_dict['schedule'] is not the schedule of a solver over "
                             f"{groups} param group(s) with lr meta-learned")

    def load_state_dict(self, state: dict[str, Any], scheduler: Any, inner: InnerOptimizer) -> None:
        """The shadows of ``state``, over light copies of the user's objects (for what a
        state dict leaves out: the scheduler's functions and children)."""
        copies = []
        for saved in state["shadows"]:
            opt, copy_scheduler = _light_copy(inner.torch_optimizer, scheduler)
            copy_scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
            for group, entries in zip(opt.param_groups, saved["param_groups"]):
                group.update(copy.deepcopy(entries))
            copies.append((opt, copy_scheduler))
        self.restore(([float(r) for r in state["reference"]], state["position"], copies))


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, Tensor))


# --- the solver's entry points --------------------------------------------------------------
def attach(scheduler: Any, inner: InnerOptimizer, learned: Sequence[str],
           start: bool = True) -> Shadows | JointShadows | None:
    """Check the scheduler the solver is given; with lr meta-learned (and ``start``),
    start its shadows."""
    if isinstance(scheduler, Schedulers):
        shadows = [None if s is None else _attach(s, part, learned, start)
                   for s, part, _, _ in _pieces(scheduler, inner)]
        return JointShadows(shadows) if "lr" in learned and start else None
    return _attach(scheduler, inner, learned, start)


def start_shadows(scheduler: Any, inner: InnerOptimizer) -> Any:
    """New shadows at the user's step count (for a checkpoint saved without them)."""
    if isinstance(scheduler, Schedulers):
        return JointShadows([None if s is None else Shadows.start(s, part)
                             for s, part, _, _ in _pieces(scheduler, inner)])
    return Shadows.start(scheduler, inner)


def check_shadows(state: Any, scheduler: Any, inner: InnerOptimizer) -> None:
    """Raise ``ValueError`` if ``state`` is not the shadows' state_dict of this setup."""
    if not isinstance(scheduler, Schedulers):
        Shadows.check_state(state, len(inner.groups))
        return
    pieces = _pieces(scheduler, inner)
    saved = state.get("parts") if isinstance(state, dict) else None
    if not isinstance(saved, list) or len(saved) != len(pieces):
        raise ValueError(f"state_dict['schedule'] is not the schedule of a solver over "
                         f"{len(pieces)} optimizers with lr meta-learned")
    for entry, (s, part, _, _) in zip(saved, pieces):
        if (entry is None) != (s is None):
            raise ValueError("state_dict['schedule'] was saved with schedulers on other optimizers")
        if entry is not None:
            Shadows.check_state(entry, len(part.groups))


def load_shadows(shadows: Any, state: dict[str, Any], scheduler: Any, inner: InnerOptimizer) -> None:
    if not isinstance(scheduler, Schedulers):
        shadows.load_state_dict(state, scheduler, inner)
        return
    for p, entry, (s, part, _, _) in zip(shadows.parts, state["parts"], _pieces(scheduler, inner)):
        if p is not None:
            p.load_state_dict(entry, s, part)


def _attach(scheduler: Any, inner: InnerOptimizer, learned: Sequence[str],
            start: bool = True) -> Shadows | None:
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or \
            isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(f"scheduler must be a torch.optim.lr_scheduler schedule of the step count, "
                        f"not {type(scheduler).__name__} (ReduceLROnPlateau reads a metric)")
    if scheduler.optimizer is not inner.torch_optimizer:
        raise ValueError("the scheduler drives a different optimizer than the solver's")
    for node in _tree(scheduler):
        if getattr(node, "cycle_momentum", False):
            name = "beta1" if getattr(node, "use_beta1", False) else "momentum"
            if name in learned:
                raise ValueError(f"{type(node).__name__} changes {name} at every step, so it "
                                 f"cannot be meta-learned with this scheduler")
    return Shadows.start(scheduler, inner) if "lr" in learned and start else None


def build_schedule(scheduler: Any, inner: InnerOptimizer, steps: int, learned: frozenset[str],
                   shadows: Any) -> Schedule:
    """The hyperparameters of unroll steps 0 … steps−1: the values from a light copy of
    the user's objects; with lr meta-learned, its derivative from the shadows, eq. (2)."""
    if isinstance(scheduler, Schedulers):
        own = [None] * len(scheduler.schedulers) if shadows is None else shadows.parts
        return _joined([(None if s is None else _build(s, part, steps, learned, shadow), len(part.params))
                        for (s, part, _, _), shadow in zip(_pieces(scheduler, inner), own)], steps)
    return _build(scheduler, inner, steps, learned, shadows)


def _build(scheduler: Any, inner: InnerOptimizer, steps: int, learned: frozenset[str],
           shadows: Shadows | None) -> Schedule:
    name = type(scheduler).__name__
    seen = _walk(_light_copy(inner.torch_optimizer, scheduler), steps,
                 lambda group: inner.rule.read_group(group)[1])
    groups, group_of = range(len(seen[0])), inner.group_of()
    changed = [n for n, v in seen[0][0].items() if n != "lr" and isinstance(v, float)
               and any(seen[j][g][n] != seen[0][g][n] for j in range(steps) for g in groups)]
    for n in changed:
        if n in learned:
            raise ValueError(f"{name} changes {n} at every step, so it cannot be meta-learned "
                             f"with this scheduler")
    derivative = [[0.0 for _ in groups] for _ in range(steps)]       # ∂lr_j,g/∂B_g
    if "lr" in learned:
        assert shadows is not None
        shadows.follow(scheduler, inner)
        derivative = _derivative(name, shadows, inner, [[seen[j][g]["lr"] for g in groups]
                                                        for j in range(steps)])
    bases = base_lrs(inner)
    value: list[dict[str, list[float | None]]] = []
    scale: list[dict[str, list[float | None]]] = []
    for j in range(steps):
        value.append({n: [float(seen[j][g][n]) for g in group_of] for n in ["lr", *changed]})
        scale.append({n: [derivative[j][g] if n == "lr" else 0.0 for g in group_of]
                      for n in ["lr", *changed]})
    origin: dict[str, list[float | None]] = {n: [bases[g] if n == "lr" else 0.0 for g in group_of]
                                             for n in ["lr", *changed]}
    return Schedule(value, scale, origin)


def _derivative(name: str, shadows: Shadows, inner: InnerOptimizer,
                lrs: list[list[float]]) -> list[list[float]]:
    """a_j,g / R_g of eq. (2), checking (1) on the shadows and the user's lrs against it."""
    one, two, three = shadows.ahead(len(lrs))
    bases, reference = base_lrs(inner), shadows.reference
    out = []
    for j, user in enumerate(lrs):
        row = []
        for g, lr in enumerate(user):
            a = two[j][g] - one[j][g]
            c = one[j][g] - a
            size = max(abs(one[j][g]), abs(two[j][g]), abs(three[j][g]), 3 * abs(reference[g]))
            if abs(c + 3 * a - three[j][g]) > TOLERANCE * size:
                raise ValueError(f"{name}'s learning rate is not affine in its base learning rate "
                                 f"(group {g}, unroll step {j}), so a meta-learned base lr cannot "
                                 f"be followed through it")
            k = bases[g] / reference[g]
            expected = c + a * k
            group = inner.torch_optimizer.param_groups[g]
            size = max([abs(bases[g]), abs(reference[g]), abs(lr), abs(c), abs(a * k)]
                       + [abs(float(group[key])) for key in LR_KEYS if key in group])
            if abs(lr - expected) > TOLERANCE * size:
                raise ValueError(
                    f"param group {g}'s lr at unroll step {j} would be {lr!r}, but {name} run "
                    f"from base lr {bases[g]!r} gives {expected!r}: the optimizer's lr (or the "
                    f"scheduler's state: base_lrs, initial_lr, last_epoch) was changed outside "
                    f"the scheduler since the solver was built. Change the lr only through "
                    f"the scheduler, or build a new GimliSolver after changing it")
            row.append(a / reference[g])
        out.append(row)
    return out


def rebase(scheduler: Any, inner: InnerOptimizer, new_bases: list[float], schedule: Schedule,
           shadows: Any) -> None:
    """After a meta-step: make the user's scheduler (each scheduler inside it too) run
    from the meta-learned base learning rates, and set each group's current lr by (2).

    The lr-like entries are set from the shadow at k = 1 (the entries at base R) times
    B_new/R, not scaled from the current base, which a projection may have put at 0."""
    if isinstance(scheduler, Schedulers):
        for (s, part, g0, t0), shadow in zip(_pieces(scheduler, inner), shadows.parts):
            if s is not None:
                _rebase(s, part, new_bases[g0:g0 + len(part.groups)],
                        schedule.part(t0, t0 + len(part.params)), shadow)
        return
    _rebase(scheduler, inner, new_bases, schedule, shadows)


def _rebase(scheduler: Any, inner: InnerOptimizer, new_bases: list[float], schedule: Schedule,
            shadows: Shadows) -> None:
    _, reference_scheduler = shadows.copies[0]
    nodes = list(zip(_tree(scheduler), _tree(reference_scheduler)))
    reference_groups = shadows.copies[0][0].param_groups
    for g, group in enumerate(inner.torch_optimizer.param_groups):
        old, new, r = float(group["initial_lr"]), new_bases[g], shadows.reference[g]
        i = inner.groups[g].start        # (write_back put the base lr into group["lr"])
        lr = schedule.value[0]["lr"][i] + schedule.scale[0]["lr"][i] * (new - old)
        size = max(abs(schedule.value[0]["lr"][i]), abs(r), abs(new), abs(old))
        group["lr"] = 0.0 if -TOLERANCE * size <= lr < 0 else lr    # rounding below 0: 0
        if new == old:
            continue
        for key in LR_KEYS[2:]:
            if key in group:
                group[key] = float(reference_groups[g][key]) * new / r
        for node, reference_node in nodes:
            if hasattr(node, "base_lrs"):
                node.base_lrs[g] = float(reference_node.base_lrs[g]) * new / r
        group["initial_lr"] = new
    scheduler._last_lr = [group["lr"] for group in inner.torch_optimizer.param_groups]
