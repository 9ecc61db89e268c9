"""The meta-parameter container φ = (φ^opt, φ^loss, θ₀): Algorithm 1's split and join.

A learned hyperparameter stays inside its valid range, the values ``torch.optim``'s
constructor accepts (each rule's ``RANGES``, narrowed by its flags): it is either
projected back after each meta-update (``"project"``), or learned through a map
whose image lies inside (``"log"``: the meta-parameter is log x; ``"logit"``: it is
log x − log(1 − x)). Either way the value the unroll uses and the value written
into ``param_groups`` pass through one guard, a clamp onto the representable
values inside the range (a σ(z) that rounds to 1.0 becomes the largest value
below 1), so no value ``torch.optim`` would refuse is ever used or written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .optim import InnerOptimizer, bind
from .optim._core import REAL, Interval, hyper_dtype

GRANULARITIES = ("scalar", "group", "tensor", "element")
# one value per inner step of the unroll (a schedule), shared by every group or per group
STEPWISE = {"step": "scalar", "group-step": "group"}
# how a hyperparameter x is held by its meta-parameter z, and the values each map reaches
TRANSFORMS = ("project", "log", "logit")
_IMAGE = {"log": Interval(0.0, lo_open=True), "logit": Interval(0.0, 1.0, lo_open=True, hi_open=True)}


class MetaParams(nn.Module):
    """Declares what is meta-learned; ``.parameters()`` feeds the meta-optimizer.

    Args:
        optimizer: the inner ``torch.optim`` optimizer whose hyperparameters are
            learned (needed only when ``hypers`` is given), or the list of them when
            several step the model (each over its own tensors; the solver gets the
            same list). Their param groups then count end to end, the first
            optimizer's first.
        hypers: φ^opt, hyperparameter name → granularity, one of ``"scalar"``
            (one value), ``"group"`` (one per param group), ``"tensor"`` (one per
            parameter tensor) or ``"element"`` (one per parameter element); a
            plain list of names means ``"scalar"``. Names are those of the
            optimizer's param groups, with Adam's ``betas`` split into ``beta1``
            and ``beta2``. With several optimizers, a name covers the groups of
            every optimizer that has it (``"lr"`` per group: each optimizer's
            groups' lrs; ``"beta1"``: AdamW's groups only), and its granularity
            counts those groups, tensors or elements. Initial values are read from
            ``optimizer.param_groups`` (``lr`` from ``initial_lr`` where an LR
            scheduler is attached: its base lr).
            A module-valued hyperparameter (``LearnedOptimizer``'s ``"net"``) takes
            ``"scalar"`` and contributes its own weights. ``"step"`` (one value per inner
            step j of a ``steps``-step unroll) and ``"group-step"`` (per step and group)
            learn a whole schedule over the unroll; each starts at the optimizer's value.
        transform: how each hyperparameter is kept inside its valid range (the values
            ``torch.optim``'s constructor accepts, ``meta.ranges[name]``), name → one of

            * ``"project"`` (default): the meta-parameter is the value x itself; after
              each meta-update (:meth:`constrain_`, called by ``GimliSolver.step``) it is
              projected back into the range: onto a closed end, or onto the nearest
              representable value inside an open one (β₂ ≤ 1 − 2⁻²⁴ in float32).
            * ``"log"``: the meta-parameter is z = log x, and x = exp z > 0; for a range
              that holds (0, ∞) (learning rates, weight decays, ε).
            * ``"logit"``: z = log x − log(1 − x), x = σ(z) ∈ (0, 1); for a range that
              holds (0, 1) (Adam's β, RMSprop's α, Adadelta's ρ).

            A map whose image is not inside the range (log for a β), or that cannot
            represent the initial value (log of 0), is refused with the reason. The
            hypergradient ``hypers.<name>`` is with respect to what is learned: z.
        loss: φ^loss, name → tensor or ``nn.Module``, read by ``loss_fn`` as
            ``meta[name]``. A tensor is wrapped as an ``nn.Parameter`` (sharing
            its storage); a module contributes all its parameters.
        init: the model itself, to meta-learn its initial weights θ₀ (MAML). The
            meta-parameters are then the model's own parameters.
        steps: J, the unroll's number of inner steps, for a hyperparameter learned per
            ``"step"`` or ``"group-step"`` (and only then).

    Parameters are named ``hypers.<name>``, ``loss.<name>[.<sub>]`` and
    ``init.<model parameter name>``; hypergradients are keyed the same way. A
    hyperparameter's meta-parameter is kept in the model's dtype, but at least in
    float32 (``torch.optim`` keeps hyperparameters as Python floats: a bfloat16 model
    still steps with β₂ = 0.999, which bfloat16 would round to 1).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                 hypers: Mapping[str, str] | Iterable[str] = (), *,
                 transform: Mapping[str, str] | None = None,
                 loss: Mapping[str, Tensor | nn.Module] | None = None,
                 init: nn.Module | None = None, steps: int | None = None):
        super().__init__()
        granularity = dict(hypers) if isinstance(hypers, Mapping) else dict.fromkeys(
            [hypers] if isinstance(hypers, str) else hypers, "scalar")   # "lr": one name
        if granularity and optimizer is None:
            raise ValueError("MetaParams: pass the inner optimizer to meta-learn its hyperparameters")
        transforms = dict(transform or {})
        unknown = sorted(set(transforms) - set(granularity))
        if unknown:
            raise ValueError(f"MetaParams: transform= names {', '.join(unknown)}, which hypers= "
                             f"does not declare")
        stepwise = sorted(name for name, per in granularity.items() if per in STEPWISE)
        if stepwise and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"MetaParams: {', '.join(stepwise)} is learned per step: give steps=J, "
                             f"the number of inner steps of the unroll")
        if steps is not None and not stepwise:
            raise ValueError("MetaParams: steps= is for a hyperparameter learned per 'step' or "
                             "'group-step'; none is")
        self.steps = steps                          # J of a per-step schedule, or None
        self.inner: InnerOptimizer | None = None if optimizer is None else bind(optimizer)
        self.granularity: dict[str, str] = {}
        self.transform: dict[str, str] = {}         # name → how it is kept in range
        self.ranges: dict[str, Interval] = {}       # name → the values torch.optim accepts
        self.hypers = nn.Module()
        modules = {} if self.inner is None else self.inner.module_hypers()
        for name, per in granularity.items():
            assert self.inner is not None
            if name in modules:                 # a learned optimizer's network: its own weights
                if per != "scalar":
                    raise ValueError(f"{name!r} is a module shared by every tensor: its granularity "
                                     f"is 'scalar', not {per!r}")
                if name in transforms:
                    raise ValueError(f"{name!r} is a module: its weights have no range and take no "
                                     f"transform")
                self.hypers.add_module(name, modules[name])
                self.granularity.update({f"{name}.{n}": "scalar"
                                         for n, _ in modules[name].named_parameters()})
                continue
            kind = transforms.get(name, "project")
            start = _initial_value(self.inner, name, STEPWISE.get(per, per))
            if per in STEPWISE:                     # the same value at every step, to start
                assert steps is not None
                start = start.expand(steps, *start.shape).clone()
            self.ranges[name] = valid_range(self.inner, name)
            _check_transform(self.inner, name, kind, self.ranges[name], start)
            self.hypers.register_parameter(name, nn.Parameter(_inverse(kind, start)))
            self.granularity[name] = per
            self.transform[name] = kind
        self.loss = nn.Module()
        self._loss_entries: dict[str, Tensor | nn.Module] = {}
        for name, value in (loss or {}).items():
            if isinstance(value, nn.Module):
                self.loss.add_module(name, value)
            elif isinstance(value, Tensor):
                if not value.is_floating_point():
                    raise TypeError(f"MetaParams: loss entry {name!r} must be a floating-point tensor")
                value = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
                self.loss.register_parameter(name, value)
            else:
                raise TypeError(f"MetaParams: loss entry {name!r} must be a tensor or an nn.Module, "
                                f"not {type(value).__name__}")
            self._loss_entries[name] = value
        self.init = init

    def __getitem__(self, name: str) -> Tensor | nn.Module:
        """The φ^loss entry ``name``, as ``loss_fn`` reads it."""
        try:
            return self._loss_entries[name]
        except KeyError:
            raise KeyError(f"no loss meta-parameter {name!r}; declared: "
                           f"{sorted(self._loss_entries)}") from None

    def hyper(self, name: str) -> Tensor:
        """The meta-parameter holding hyperparameter ``name``: the value itself, or its
        log or logit under ``transform=`` (see :meth:`value`)."""
        return self.hypers.get_parameter(name)

    def value(self, name: str) -> Tensor:
        """Hyperparameter ``name``'s values, in its meta-parameter's shape (one per group,
        tensor or element): the transform applied to the meta-parameter, then clamped
        onto the representable values of its valid range; differentiable."""
        raw = self.hyper(name)
        kind = self.transform.get(name)
        if kind is None:                                        # a module's weights
            return raw
        x = raw if kind == "project" else raw.exp() if kind == "log" else torch.sigmoid(raw)
        lo, hi = self.ranges[name].representable(x.dtype)
        return x.clamp(lo, hi)                                  # the guard (module doc)

    def stepwise(self) -> frozenset[str]:
        """The hyperparameters learned per inner step (``"step"``, ``"group-step"``)."""
        return frozenset(name for name, per in self.granularity.items() if per in STEPWISE)

    def expand(self, name: str, step: int | None = None) -> list[Tensor | None]:
        """Hyperparameter ``name`` as one tensor per parameter tensor (0-dim or the
        parameter's shape), in the optimizer's order; differentiable (with respect to
        the meta-parameter, through the transform). A hyperparameter learned per step
        takes ``step``, the inner step j whose values are meant. With several
        optimizers, a tensor whose optimizer has no hyperparameter ``name`` gets ``None``."""
        assert self.inner is not None
        raw, per, inner = self.hyper(name), self.granularity[name], self.inner
        groups = inner.groups_with(name)        # (with one optimizer: every group)
        place = {g: k for k, g in enumerate(groups)}        # a group's index among those
        owner = [place.get(g) for g in inner.group_of()]    # per tensor (None: not its own)
        mine = [p for p, k in zip(inner.params, owner) if k is not None]
        if per in STEPWISE:
            if step is None:
                raise ValueError(f"{name} is learned per step: say which step's values")
            assert self.steps is not None
            needed = (self.steps,) if per == "step" else (self.steps, len(groups))
            if tuple(raw.shape) != needed:
                raise ValueError(f"meta-parameter hypers.{name} has shape {tuple(raw.shape)}, but "
                                 f"{per!r} granularity over {self.steps} steps needs {needed}")
            value = self.value(name)[step]
            return [None if k is None else value if per == "step" else value[k] for k in owner]
        shape = {"scalar": (), "group": (len(groups),), "tensor": (len(mine),),
                 "element": (sum(p.numel() for p in mine),)}[per]
        if "." not in name and tuple(raw.shape) != shape:       # (a module's weights: their own)
            raise ValueError(f"meta-parameter hypers.{name} has shape {tuple(raw.shape)}, but "
                             f"{per!r} granularity over this optimizer needs {shape}")
        value = self.value(name)
        if per == "scalar":
            return [None if k is None else value for k in owner]
        if per == "group":
            return [None if k is None else value[k] for k in owner]
        pieces = iter(value.unbind() if per == "tensor" else
                      [v.view_as(p) for v, p in zip(value.split([p.numel() for p in mine]), mine)])
        return [None if k is None else next(pieces) for k in owner]

    def hyper_values(self, name: str) -> list[Tensor | None]:
        """Hyperparameter ``name`` per parameter tensor, detached (to inspect or plot);
        ``None`` for a tensor whose optimizer has no such hyperparameter."""
        return [None if v is None else v.detach() for v in self.expand(name)]

    def constrain_(self) -> None:
        """Put every meta-parameter back into its valid set after a meta-update (in place):
        a ``"project"`` hyperparameter onto the representable values of its range; a log
        or logit one is valid by construction. A NaN stays NaN and an infinite value
        infinite where the range is unbounded, for the solver to report as non-finite."""
        with torch.no_grad():
            for name, kind in self.transform.items():
                valid = self.ranges[name]
                if kind != "project" or valid == REAL:
                    continue
                p = self.hyper(name)
                lo, hi = valid.representable(p.dtype)
                p.clamp_(lo if math.isfinite(valid.lo) else None, hi if math.isfinite(valid.hi) else None)

    def write_back(self) -> None:
        """Write scalar and per-group hyperparameters into the optimizer's param_groups,
        so the user's own training loop uses the meta-learned values. A value outside
        the range ``torch.optim`` accepts is never written (a ValueError instead)."""
        if self.inner is None:
            return
        writes = []
        for name, per in self.granularity.items():
            if per not in ("scalar", "group") or "." in name:     # a module's own weights
                continue
            value = self.value(name).detach()
            for k, g in enumerate(self.inner.groups_with(name)):
                x = float(value if per == "scalar" else value[k])
                if x not in self.ranges[name]:
                    raise ValueError(f"refusing to write {name} = {x} into param group {g} of "
                                     f"{self.inner.name}: torch.optim accepts {self.ranges[name]}")
                writes.append((g, name, x))
        for g, name, x in writes:
            _set_group_value(self.inner, g, name, x)


def valid_range(inner: InnerOptimizer, name: str) -> Interval:
    """The values of hyperparameter ``name`` that ``torch.optim``'s constructor accepts
    under every param group's flags (the rule's ``ranges(flags)`` or ``RANGES``; the
    whole real line where a rule declares none, as a user's own optimizer)."""
    out = REAL
    for g in inner.groups_with(name):
        out = out & inner.group_rules[g].ranges_for(inner.flags[g]).get(name, REAL)
    return out


def _check_transform(inner: InnerOptimizer, name: str, kind: str, valid: Interval,
                     value: Tensor) -> None:
    """Refuse a transform that is unknown, whose image leaves the valid range, or that
    cannot hold the initial value; and an initial value outside the range."""
    if kind not in TRANSFORMS:
        raise ValueError(f"transform of {name!r} must be one of {TRANSFORMS}, not {kind!r}")
    image = _IMAGE.get(kind, valid)                 # "project" reaches the range itself
    if not valid.covers(image):
        fits = ["project"] + [k for k, im in _IMAGE.items() if valid.covers(im)]
        raise ValueError(f"transform {kind!r} maps onto {image}, which is not inside the values "
                         f"{inner.name} accepts for {name}, {valid}: use "
                         f"{' or '.join(repr(k) for k in fits)}")
    bad = [x for x in value.unique().tolist() if x not in valid or x not in image]
    if bad and bad[0] not in valid:
        raise ValueError(f"{inner.name}'s {name} = {bad[0]} is outside the values torch.optim "
                         f"accepts, {valid}, so it cannot be meta-learned from there")
    if bad:
        raise ValueError(f"transform {kind!r} cannot represent the initial {name} = {bad[0]} "
                         f"(it reaches {image} only): start from a value inside, or use "
                         f"'project'")


def _inverse(kind: str, value: Tensor) -> Tensor:
    """z such that the transform gives ``value`` back (up to rounding)."""
    if kind == "log":
        return value.log()
    if kind == "logit":
        return value.log() - (-value).log1p()
    return value


def _initial_value(inner: InnerOptimizer, name: str, per: str) -> Tensor:
    if name not in inner.hyper_names:
        raise ValueError(f"{inner.name} has no differentiable hyperparameter {name!r}; "
                         f"its hyperparameters are {', '.join(inner.hyper_names)}")
    owners = inner.groups_with(name)
    allowed = tuple(p for p in GRANULARITIES
                    if all(p in rule.granularities_of(name) for rule in inner.rules_for(name)))
    if per not in allowed:
        raise ValueError(f"granularity of {name!r} for {inner.name} must be one of {allowed}, "
                         f"not {per!r}")
    for rule in inner.rules_for(name):
        unread = rule.no_hypergradient
        if name in unread:
            raise ValueError(f"{name} cannot be meta-learned with {inner.name}: {unread[name]}, so "
                             f"the hypergradient of a loss on θ is identically 0")
    for g in owners:
        off = inner.group_rules[g].inactive_hypers(inner.flags[g])
        if name in off:
            raise ValueError(f"{inner.name}, param group {g}: {name} {off[name]}")
    groups = inner.group_hypers()
    per_group = [float(groups[g][name]) for g in owners]
    if name == "lr":               # where an LR scheduler drives an optimizer: its base lr
        scheduled = [all("initial_lr" in g for g in part.torch_optimizer.param_groups)
                     for part in inner.parts() for _ in part.groups]
        torch_groups = inner.torch_optimizer.param_groups
        per_group = [float(torch_groups[g]["initial_lr"]) if scheduled[g] else value
                     for g, value in zip(owners, per_group)]
    ref = inner.params[0]
    kw: dict[str, Any] = {"dtype": hyper_dtype(ref.dtype), "device": ref.device}
    if per == "scalar":
        if len(set(per_group)) > 1:
            raise ValueError(f"{name} differs between param groups ({per_group}); "
                             f"meta-learn it per 'group' or make the groups agree")
        return torch.tensor(per_group[0], **kw)
    if per == "group":
        return torch.tensor(per_group, **kw)
    place = {g: k for k, g in enumerate(owners)}
    tensors = [(p, per_group[place[g]]) for p, g in zip(inner.params, inner.group_of()) if g in place]
    if per == "tensor":
        return torch.tensor([v for _, v in tensors], **kw)
    return torch.cat([torch.full((p.numel(),), v, **kw) for p, v in tensors])


def _set_group_value(inner: InnerOptimizer, g: int, name: str, value: float) -> None:
    """Hyperparameter ``name`` of param group ``g`` set to ``value``, where its rule keeps it."""
    group = inner.torch_optimizer.param_groups[g]
    key, index = inner.group_rules[g].group_key(name)
    if index is None:
        group[key] = value
    else:
        entry = list(group[key])
        entry[index] = value
        group[key] = tuple(entry)
