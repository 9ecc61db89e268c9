"""Differentiable counterparts of ``torch.optim`` optimizers.

One file per optimizer (``sgd.py``, ``adam.py``, ``adagrad.py``), each a
``State`` and pure ``step``/``vjp`` functions over lists of tensors; this
module binds a user's ``torch.optim`` instance to the right file, reading its
param groups and its current state, and applies the pure functions group by
group over the whole parameter list.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import adagrad, adam, sgd
from ._core import VJP, Hypers

__all__ = ["InnerOptimizer", "SUPPORTED", "bind"]

SUPPORTED: dict[type[torch.optim.Optimizer], ModuleType] = {
    torch.optim.SGD: sgd,
    torch.optim.Adam: adam,
    torch.optim.AdamW: adam,
    torch.optim.Adagrad: adagrad,
}

# Group entries that only select an implementation: accepted and ignored.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


@dataclass
class InnerOptimizer:
    """A ``torch.optim`` instance seen as a pure, differentiable step.

    ``params`` lists the optimizer's tensors in param-group order; group ``g``
    owns ``params[groups[g]]``, with static ``flags[g]`` and numeric
    hyperparameters ``hypers[g]`` (names as in the optimizer file's HYPERS).
    """

    torch_optimizer: torch.optim.Optimizer
    rule: ModuleType
    params: list[Tensor]
    groups: list[slice]
    flags: list[Any]

    @property
    def name(self) -> str:
        return type(self.torch_optimizer).__name__

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(self.rule.HYPERS)

    def group_hypers(self) -> list[dict[str, float]]:
        """The current numeric hyperparameters of each param group."""
        return [self.rule.read_group(g)[1] for g in self.torch_optimizer.param_groups]

    def group_of(self) -> list[int]:
        """The index of the param group each tensor belongs to."""
        return [g for g, sl in enumerate(self.groups) for _ in range(sl.start, sl.stop)]

    def constant_hypers(self) -> Hypers:
        """Every hyperparameter as one 0-dim tensor per parameter, from param_groups."""
        values = self.group_hypers()
        return {name: [torch.tensor(values[g][name], dtype=p.dtype, device=p.device)
                       for p, g in zip(self.params, self.group_of())]
                for name in self.hyper_names}

    def read_state(self) -> Any:
        """A copy of the optimizer's current state, as the optimizer file's ``State``."""
        groups = self.torch_optimizer.param_groups
        per_param = [self.rule.read_state(self.torch_optimizer.state.get(p, {}), p, groups[g])
                     for p, g in zip(self.params, self.group_of())]
        return self.rule.State(*([entry[0] for entry in field] for field in zip(*per_param)))

    def step(self, params: list[Tensor], state: Any, grads: list[Tensor | None],
             hp: Hypers) -> tuple[list[Tensor], Any]:
        """One update of every tensor; a tensor whose gradient is ``None`` is left
        alone with its state, as ``torch.optim`` does."""
        new_params = list(params)
        new_state = [list(field) for field in state]
        for g, idx in self._active(grads):
            out_params, out_state = self.rule.step(
                self.flags[g], *self._take(idx, params, state, grads, hp))
            for k, i in enumerate(idx):
                new_params[i] = out_params[k]
                for field, values in zip(new_state, out_state):
                    field[i] = values[k]
        return new_params, self.rule.State(*new_state)

    def vjp(self, params: list[Tensor], state: Any, grads: list[Tensor | None], hp: Hypers,
            cot_params: list[Tensor], cot_state: Any, need: frozenset[str]) -> VJP:
        """The four cotangents of :meth:`step`. A tensor that did not step passes
        its cotangents through unchanged and gets no o_j (``None``) and no a_j."""
        b = list(cot_params)
        s = [list(field) for field in cot_state]
        o: list[Tensor | None] = [None] * len(params)
        a: dict[str, list[Tensor | None]] = {name: [None] * len(params) for name in need}
        for g, idx in self._active(grads):
            sub = self._take(idx, params, state, grads, hp)
            out = self.rule.vjp(self.flags[g], *sub, [cot_params[i] for i in idx],
                                self.rule.State(*([f[i] for i in idx] for f in cot_state)), need)
            for k, i in enumerate(idx):
                b[i], o[i] = out.params[k], out.grads[k]
                for field, values in zip(s, out.state):
                    field[i] = values[k]
                for name in need:
                    a[name][i] = out.hypers[name][k]
        return VJP(b, self.rule.State(*s), o, a)  # type: ignore[arg-type]

    def _active(self, grads: list[Tensor | None]) -> list[tuple[int, list[int]]]:
        out = []
        for g, sl in enumerate(self.groups):
            idx = [i for i in range(sl.start, sl.stop) if grads[i] is not None]
            if idx:
                out.append((g, idx))
        return out

    def _take(self, idx: list[int], params: list[Tensor], state: Any,
              grads: list[Tensor | None], hp: Hypers) -> tuple[Any, ...]:
        return ([params[i] for i in idx], self.rule.State(*([f[i] for i in idx] for f in state)),
                [grads[i] for i in idx], {k: [v[i] for i in idx] for k, v in hp.items()})


def bind(optimizer: torch.optim.Optimizer) -> InnerOptimizer:
    """Read a ``torch.optim`` instance: its class, param groups and flags."""
    rule = SUPPORTED.get(type(optimizer))
    if rule is None:
        names = ", ".join(sorted({cls.__name__ for cls in SUPPORTED}))
        raise TypeError(f"gimli cannot differentiate through {type(optimizer).__name__}: "
                        f"the supported optimizers are {names} (exact classes, not subclasses)")
    params: list[Tensor] = []
    groups: list[slice] = []
    flags = []
    for group in optimizer.param_groups:
        groups.append(slice(len(params), len(params) + len(group["params"])))
        params.extend(group["params"])
        flags.append(rule.read_group(group)[0])
        for p in group["params"]:
            if p.is_complex() or p.is_sparse:
                raise TypeError(f"gimli supports dense real parameters only; {type(optimizer).__name__} "
                                f"holds a {'complex' if p.is_complex() else 'sparse'} tensor")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a tensor appears twice in the optimizer's param_groups")
    return InnerOptimizer(optimizer, rule, params, groups, flags)
