"""Learning-rate schedules inside the unroll, without advancing the user's scheduler.

Unroll step j uses the hyperparameters the real scheduler would set at step t+j
(t: where the scheduler is now). The scheduler is replayed on a copy of it and
of the optimizer, from its first step, with its base learning rates scaled by
k = 1, 2 and 3: the learning rate at each step must be affine in k,

    lr_j,g(k) = c_j,g + a_j,g·k   (checked at k = 3),

so with a meta-learned base learning rate φ_g (taking the place of the
scheduler's base lr B_g), step j uses lr_j,g = (a_j,g / B_g)·φ_g + c_j,g: the
scheduled factor times the meta-learned base. Other hyperparameters a scheduler
changes (OneCycleLR's momentum or β₁) are replayed as constants and cannot be
meta-learned with it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .optim import InnerOptimizer

# param-group entries that scale with the base learning rate (OneCycleLR keeps three)
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class Schedule(NamedTuple):
    """Per unroll step j: each scheduled hyperparameter, per tensor, as scale·v + shift,
    where v is its un-scheduled value (for lr: the base lr, or φ where meta-learned)."""

    scale: list[dict[str, list[float]]]
    shift: list[dict[str, list[float]]]

    def at(self, j: int, hp: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        """The hyperparameters of step j."""
        out = dict(hp)
        for name, scale in self.scale[j].items():
            out[name] = [s * v + c for s, v, c in zip(scale, hp[name], self.shift[j][name])]
        return out

    def pull_back(self, j: int, name: str,
                  cotangents: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Cotangents w.r.t. step j's values → w.r.t. the un-scheduled values."""
        if name not in self.scale[j]:
            return list(cotangents)
        return [None if a is None else s * a for s, a in zip(self.scale[j][name], cotangents)]


def check_scheduler(scheduler: Any, inner: InnerOptimizer) -> None:
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or \
            isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(f"scheduler must be a torch.optim.lr_scheduler schedule of the step count, "
                        f"not {type(scheduler).__name__} (ReduceLROnPlateau reads a metric)")
    if scheduler.optimizer is not inner.torch_optimizer:
        raise ValueError("the scheduler drives a different optimizer than the solver's")


def base_lrs(inner: InnerOptimizer) -> list[float]:
    """The scheduler's base learning rate of each group (what φ^lr replaces)."""
    return [float(group["initial_lr"]) for group in inner.torch_optimizer.param_groups]


def _replay(scheduler: Any, inner: InnerOptimizer, k: float, steps: int) -> list[list[dict[str, Any]]]:
    """Each group's hyperparameters at unroll steps 0 … steps−1, on copies, with the
    base learning rates scaled by k."""
    opt, sched = copy.deepcopy((inner.torch_optimizer, scheduler))
    for group in opt.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] = float(group[key]) * k
        group["lr"] = group["initial_lr"]
    sched.base_lrs = [float(b) * k for b in sched.base_lrs]
    now = scheduler.last_epoch
    sched.last_epoch = -1
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "lr_scheduler.step() before optimizer.step()"
        # the constructor's own first step (a chainable schedule does not decay on it)
        getattr(sched, "_initial_step", sched.step)()
        for epoch in range(now + steps):
            if epoch > 0:
                sched.step()
            if epoch >= now:
                out.append([inner.rule.read_group(group)[1] for group in opt.param_groups])
    return out


def build_schedule(scheduler: Any, inner: InnerOptimizer, steps: int,
                   learned: frozenset[str]) -> Schedule:
    runs = {k: _replay(scheduler, inner, k, steps) for k in (1.0, 2.0, 3.0)}
    current = inner.group_hypers()
    for g, values in enumerate(runs[1.0][0]):
        for name, value in values.items():
            if isinstance(value, float) and not math.isclose(value, float(current[g][name]),
                                                             rel_tol=1e-12, abs_tol=1e-300):
                raise ValueError(f"replaying {type(scheduler).__name__} from its start does not give "
                                 f"the optimizer's current {name} ({value} vs {current[g][name]}); "
                                 f"gimli needs a schedule that is a function of the step count")
    bases = base_lrs(inner)
    group_of = inner.group_of()
    scale: list[dict[str, list[float]]] = []
    shift: list[dict[str, list[float]]] = []
    for j in range(steps):
        one, two, three = runs[1.0][j], runs[2.0][j], runs[3.0][j]
        a = [two[g]["lr"] - one[g]["lr"] for g in range(len(one))]
        c = [one[g]["lr"] - a[g] for g in range(len(one))]
        for g in range(len(one)):
            if not math.isclose(c[g] + 3 * a[g], three[g]["lr"], rel_tol=1e-9, abs_tol=1e-15):
                raise ValueError(f"{type(scheduler).__name__}'s learning rate is not affine in its "
                                 f"base learning rate; gimli cannot replay it")
        scale_j = {"lr": [a[g] / bases[g] for g in group_of]}
        shift_j = {"lr": [c[g] for g in group_of]}
        for name, value in one[0].items():
            if name == "lr" or not isinstance(value, float):
                continue
            if all(one[g][name] == float(current[g][name]) for g in range(len(one))):
                continue                            # not touched by the scheduler
            if name in learned:
                raise ValueError(f"{type(scheduler).__name__} changes {name} at every step, so it "
                                 f"cannot be meta-learned with this scheduler")
            scale_j[name] = [0.0 for _ in group_of]
            shift_j[name] = [one[g][name] for g in group_of]
        scale.append(scale_j)
        shift.append(shift_j)
    return Schedule(scale, shift)


def rebase(scheduler: Any, inner: InnerOptimizer, new_bases: list[float], schedule: Schedule) -> None:
    """After a meta-step: make the user's scheduler run from the meta-learned base
    learning rates, and set each group's current lr to the scheduled value."""
    old = base_lrs(inner)
    for g, group in enumerate(inner.torch_optimizer.param_groups):
        ratio = new_bases[g] / old[g]
        for key in LR_KEYS[1:]:
            if key in group:
                group[key] = float(group[key]) * ratio
        scheduler.base_lrs[g] = new_bases[g]
        i = inner.groups[g].start
        group["lr"] = schedule.scale[0]["lr"][i] * new_bases[g] + schedule.shift[0]["lr"][i]
    scheduler._last_lr = [group["lr"] for group in inner.torch_optimizer.param_groups]
