r"""Forward-mode hypergradients: the tangents of θ'_j and σ_j carried with the unroll.

Reverse mode (``_sweep.py``) needs the whole trajectory back, so its memory grows
with J. Forward mode (Franceschi et al. 2017, "Forward and Reverse Gradient-Based
Hyperparameter Optimization") carries, for each direction d in meta-parameter space
(one per element of a learned hyperparameter or φ^loss entry), the tangents
Z_j = (dθ'_j/dφ)·d and Y_j = (dσ_j/dφ)·d, starting from Z_0 = Y_0 = 0:

    dG_j    = ∇²_θ ℓ_j Z_j + ∂_{φ^loss}∇_θ ℓ_j · d^loss
            = ∇_θ [ ⟨G_j, Z_j⟩ + ⟨∇_{φ^loss} ℓ_j, d^loss⟩ ]              one backward call
    (Z_{j+1}, Y_{j+1}) = JVP of opt_j at (θ'_j, σ_j, G_j, φ^opt_j) along (Z_j, Y_j, dG_j, d^opt_j)
    dL^val/dφ · d = ⟨∇_θ L^val(θ'_J), Z_J⟩ + ∂_{φ^loss} L^val · d^loss

(the second line by the symmetry of second derivatives: ∇_θ⟨∇_{φ^loss}ℓ, d⟩ is the
mixed derivative applied to d). Memory: one (Z, Y) per direction and one step's
graph, whatever J.

The optimizer's JVP is the transpose of the VJP the sweep uses. The VJP maps the
cotangents (P, S) of (θ'_{j+1}, σ_{j+1}) linearly to those of (θ'_j, σ_j, G_j, φ^opt_j),
so for any tangent (Z, Y, dG, d^opt):

    (Z_{j+1}, Y_{j+1}) = ∇_(P,S) ⟨VJP(P, S), (Z, Y, dG, d^opt)⟩

one autograd pass through the VJP per direction. It is the same closed form, with the
same guards (Adam's cotangent at √0), so forward mode equals reverse mode to rounding
for every optimizer, and is as finite as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from ._meta import MetaParams
from ._problem import Problem
from ._schedule import Schedule
from ._sweep import validation
from ._unroll import Point, Step, Unroll

Tangent = tuple[list[Tensor], Any]          # (Z: one tensor per θ tensor, Y: a State of lists)


class Direction(NamedTuple):
    """One tangent direction: an element of a learned hyperparameter (``name``) or of a
    φ^loss leaf (``leaf``, its index among the leaves)."""

    name: str | None
    leaf: int | None
    element: int        # the element, in the meta-parameter's flattened order


class Forward(NamedTuple):
    grads: dict[int, Tensor]        # id(meta-parameter tensor) -> its hypergradient
    val_loss: float
    final: Point
    reached: list[bool]             # per φ^loss leaf: reaches some G_j or L^val
    tangents: list[Tangent | None]  # (Z_J, Y_J) per direction (None: zero)


class Horizon:
    """The tangents carried from one meta-step to the next (``horizon="full"``): after a
    commit, the model's weights are θ'_J and these are dθ'_J/dφ and dσ_J/dφ over all the
    training committed so far, each step's hyperparameters taken as they were applied
    (real-time hyperparameter optimisation, Franceschi et al. 2017). A fingerprint of the
    weights they belong to (each tensor's sum and sum of squares, in float64) tells
    whether the model still holds them."""

    def __init__(self) -> None:
        self.tangents: list[Tangent | None] | None = None
        self.fingerprint: Tensor | None = None

    @staticmethod
    def _print(params: Sequence[Tensor]) -> Tensor:
        with torch.no_grad():
            return torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()]) for p in params]).cpu()

    def start(self, params: Sequence[Tensor], count: int) -> list[Tangent | None]:
        """The tangents an unroll from ``params`` starts with: the carried ones, or zeros."""
        if self.tangents is None:
            return [None] * count
        if len(self.tangents) != count or self.fingerprint is None \
                or not torch.equal(self._print(params), self.fingerprint):
            raise ValueError("horizon='full': the model's weights are not those of the last commit, "
                             "so the carried tangents dθ/dφ do not describe them (were they trained or "
                             "loaded outside the solver?); call solver.reset_horizon() to start the "
                             "horizon anew from the current weights")
        return list(self.tangents)

    def carry(self, tangents: list[Tangent | None], params: Sequence[Tensor]) -> None:
        self.tangents, self.fingerprint = list(tangents), self._print(params)

    def reset(self) -> None:
        self.tangents, self.fingerprint = None, None

    # the solver's transaction (a failed step leaves them as they were) and checkpoint
    def snapshot(self) -> tuple[list[Tangent | None] | None, Tensor | None]:
        return self.tangents, self.fingerprint

    def restore(self, saved: tuple[list[Tangent | None] | None, Tensor | None]) -> None:
        self.tangents, self.fingerprint = saved

    def state_dict(self) -> dict[str, Any] | None:
        """Plain lists and tensors (``torch.load(..., weights_only=True)`` reads them)."""
        if self.tangents is None:
            return None
        return {"tangents": [None if t is None else [list(t[0]), [list(field) for field in t[1]]]
                             for t in self.tangents],
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any] | None, state_type: Any) -> None:
        if state is None:
            self.reset()
            return
        self.tangents = [None if t is None else (list(t[0]), state_type(*(list(f) for f in t[1])))
                         for t in state["tangents"]]
        self.fingerprint = state["fingerprint"]


def directions(meta: MetaParams, learned: frozenset[str], leaves: Sequence[Tensor]) -> list[Direction]:
    """Every direction forward mode carries, φ^opt's first."""
    out = [Direction(name, None, e) for name in sorted(learned) if meta.hyper(name).requires_grad
           for e in range(meta.hyper(name).numel())]
    return out + [Direction(None, i, e) for i, leaf in enumerate(leaves) for e in range(leaf.numel())]


def hyper_tangents(meta: MetaParams, dirs: Sequence[Direction]) -> list[dict[str, list[Tensor]]]:
    """For each direction, the tangent of each learned hyperparameter per tensor (its
    value through the transform and the granularity's spread): J·e for the Jacobian J
    of ``meta.expand(name)``, by transposing its VJP once per direction."""
    out: list[dict[str, list[Tensor]]] = [{} for _ in dirs]
    for name in {d.name for d in dirs if d.name is not None}:
        raw = meta.hyper(name)
        with torch.enable_grad():
            every = meta.expand(name)       # (None: a tensor whose optimizer has no such name)
            values = [v for v in every if v is not None]
            probes = [torch.zeros_like(v, requires_grad=True) for v in values]
            (pulled,) = torch.autograd.grad(values, raw, probes, create_graph=True)
        mine = [k for k, d in enumerate(dirs) if d.name == name]
        found = _grads_per_direction([[(pulled, _unit(raw, dirs[k].element))] for k in mine], probes)
        for k, f in zip(mine, found):
            assert f is not None
            it = iter(torch.zeros_like(v) if t is None else t.detach() for t, v in zip(f, values))
            out[k][name] = cast(list[Tensor], [None if v is None else next(it) for v in every])
    return out


def _unit(like: Tensor, element: int) -> Tensor:
    """The basis tensor of ``like``'s shape: 1 at flat index ``element``, 0 elsewhere."""
    unit = torch.zeros_like(like).view(-1)
    unit[element] = 1
    return unit.view_as(like)


def _state_zeros(state: Any, grad: bool) -> Any:
    """A State of zeros shaped as ``state``'s floating tensors (None elsewhere)."""
    return type(state)(*([torch.zeros_like(x).requires_grad_(grad)
                          if isinstance(x, Tensor) and x.is_floating_point() else None for x in field]
                         for field in state))


def forward_hypergradient(problem: Problem, unroll: Unroll, learned: frozenset[str],
                          leaves: list[Tensor], schedule: Schedule | None, val_batch: Any, *,
                          first_order: bool = False, start: list[Tangent | None] | None = None) -> Forward:
    """The hypergradient of every learned φ^opt and φ^loss entry by forward mode, with
    the unroll run once, in order, each step's graph freed before the next. ``start``:
    the tangents at θ'_0 (carried from earlier training; default zero)."""
    inner, meta = problem.inner, problem.meta
    dirs = directions(meta, learned, leaves)
    d_hyper = hyper_tangents(meta, dirs)
    need = frozenset(name for name in learned if meta.hyper(name).requires_grad)
    point = unroll.advance(0, unroll.start, unroll.first)      # truncated: tangents start at J − K
    tangents: list[Tangent | None] = [None] * len(dirs) if start is None or unroll.first > 0 \
        else list(start)                                        # None: zero so far
    reached = [False] * len(leaves)
    for j in range(unroll.first, unroll.J):
        step, after = unroll.run(j, point, graph=True)
        reached = [r or g is not None for r, g in zip(reached, step.leaf_grads)]
        hp = unroll.hypers[j]
        d_hp = [{name: list(values) if schedule is None else
                 [torch.zeros_like(v) if t is None else t
                  for t, v in zip(schedule.pull_back(j, name, values), values)]
                 for name, values in dh.items()} for dh in d_hyper]
        d_grads = _grad_tangents(step, tangents, dirs, first_order)
        tangents = _optimizer_jvp(inner, step, after.state, hp, need, tangents, d_grads, d_hp)
        point = after
        del step
    unroll.check(point)
    val, B, direct, val_reached = validation(problem, unroll, point, leaves, val_batch)
    reached = [r or v for r, v in zip(reached, val_reached)]
    grads: dict[int, Tensor] = {}
    flat: dict[int, Tensor] = {}
    for tangent, d in zip(tangents, dirs):
        target = meta.hyper(d.name) if d.name is not None else leaves[d.leaf]   # type: ignore[index]
        if id(target) not in flat:
            flat[id(target)] = torch.zeros(target.numel(), dtype=target.dtype, device=target.device)
            grads[id(target)] = flat[id(target)].view_as(target)
        total = torch.zeros((), dtype=torch.float64, device=target.device)
        if tangent is not None:
            for b, z in zip(B, tangent[0]):
                total = total + (b.double() * z.double()).sum()
        if d.leaf is not None:
            total = total + direct[d.leaf].reshape(-1)[d.element].double()
        flat[id(target)][d.element] = total.to(target.dtype)
    return Forward(grads, val.item(), point, reached, tangents)


def _grads_per_direction(pairs: Sequence[list[tuple[Tensor, Tensor]]], inputs: list[Tensor]
                         ) -> list[tuple[Tensor | None, ...] | None]:
    """For each direction's (output, cotangent) pairs, the gradient w.r.t. ``inputs``
    (None: the direction has no pair). All directions in one backward pass through the
    shared graph, the cotangents stacked (``is_grads_batched``); the graph is kept."""
    live = [k for k, p in enumerate(pairs) if p]
    result: list[tuple[Tensor | None, ...] | None] = [None] * len(pairs)
    if not live or not inputs:
        return result
    outputs: dict[int, Tensor] = {}
    for k in live:
        for y, _ in pairs[k]:
            outputs.setdefault(id(y), y)
    if len(live) == 1:
        (k,) = live
        result[k] = torch.autograd.grad([y for y, _ in pairs[k]], inputs, [t for _, t in pairs[k]],
                                        retain_graph=True, allow_unused=True)
        return result
    given = [{id(y): t for y, t in pairs[k]} for k in live]
    stacked = [torch.stack([g[key] if key in g else torch.zeros_like(y) for g in given])
               for key, y in outputs.items()]
    with warnings.catch_warnings():         # an op without a batching rule: slower, as exact
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        found = torch.autograd.grad(list(outputs.values()), inputs, stacked, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
    for i, k in enumerate(live):
        result[k] = tuple(None if f is None else f[i] for f in found)
    return result


def _grad_tangents(step: Step, tangents: Sequence[Tangent | None], dirs: Sequence[Direction],
                   first_order: bool) -> list[list[Tensor | None] | None]:
    """dG_j along each direction: ∇_θ[⟨G_j, Z_j⟩ + ⟨∇_{φ^loss}ℓ_j, d^loss⟩] (None: zero)."""
    pairs: list[list[tuple[Tensor, Tensor]]] = []
    for tangent, d in zip(tangents, dirs):
        mine: list[tuple[Tensor, Tensor]] = []
        if tangent is not None and not first_order:         # first order: no ∇²_θ ℓ term
            mine += [(g, z) for g, z in zip(step.grads, tangent[0]) if g is not None and g.requires_grad]
        if d.leaf is not None:
            g = step.leaf_grads[d.leaf]
            if g is not None and g.requires_grad:
                mine.append((g, _unit(g, d.element)))
        pairs.append(mine)
    inputs = [t for t in step.theta if t.requires_grad]
    out: list[list[Tensor | None] | None] = []
    for found in _grads_per_direction(pairs, inputs):
        if found is None:
            out.append(None)
            continue
        it = iter(found)
        out.append([next(it) if t.requires_grad else None for t in step.theta])
    return out


def _optimizer_jvp(inner: Any, step: Step, new_state: Any, hp: dict[str, list[Tensor]],
                   need: frozenset[str], tangents: Sequence[Tangent | None],
                   d_grads: Sequence[list[Tensor | None] | None],
                   d_hp: Sequence[dict[str, list[Tensor]]]) -> list[Tangent | None]:
    """(Z_{j+1}, Y_{j+1}) for every direction: the transpose of the optimizer's VJP at
    step j, applied to (Z_j, Y_j, dG_j, d^opt_j)."""
    theta = [t.detach() for t in step.theta]
    G = [None if g is None else g.detach() for g in step.grads]
    P = [torch.zeros_like(t, requires_grad=True) for t in theta]
    S = _state_zeros(new_state, True)
    S_leaves = [x for field in S for x in field if x is not None]
    with torch.enable_grad():
        out = inner.vjp(theta, step.state, G, hp, P, S, need)
    pairs: list[list[tuple[Tensor, Tensor]]] = []
    for tangent, dG, dh in zip(tangents, d_grads, d_hp):
        mine: list[tuple[Tensor, Tensor]] = []

        def add(y: Tensor | None, t: Tensor | None) -> None:
            if y is not None and t is not None and y.requires_grad:
                mine.append((y, t))

        if tangent is not None:
            for b, z in zip(out.params, tangent[0]):
                add(b, z)
            for s_field, y_field in zip(out.state, tangent[1]):
                for s_, y in zip(s_field, y_field):
                    add(s_, y)
        if dG is not None:
            for o, dg in zip(out.grads, dG):
                add(o, dg)
        for name, values in dh.items():
            for a, t in zip(out.hypers[name], values):
                add(a, t)
        pairs.append(mine)
    result: list[Tangent | None] = []
    for found in _grads_per_direction(pairs, P + S_leaves):
        if found is None:
            result.append(None)
            continue
        Z = [torch.zeros_like(t) if z is None else z for z, t in zip(found[:len(P)], theta)]
        it = iter(found[len(P):])
        Y = type(new_state)(*([None if x is None else _or_zero(next(it), x) for x in field]
                              for field in S))
        result.append((Z, Y))
    return result


def _or_zero(found: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like).detach() if found is None else found
