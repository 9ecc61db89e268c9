"""User-defined optimizers: per-tensor pure functions turned into a gimli rule.

The user supplies, for one parameter tensor,

* ``init(param, group) -> dict[str, Tensor]``: the state ``torch.optim`` would
  create before the first step;
* ``step(param, state, grad, hp) -> (param, state)``: the pure update, with
  ``hp`` the hyperparameters by name (0-dim or parameter-shaped tensors);
* optionally ``vjp(param, state, grad, hp, cot_param, cot_state) ->
  (param_bar, state_bar, grad_bar, hp_bar)``: its closed-form VJP. Without it
  the engine takes the four cotangents by autograd on that one step, still
  inside the hand-written sweep.

``register_optimizer`` ties these to the user's own ``torch.optim.Optimizer``
subclass, whose param groups hold the hyperparameters and whose ``state[p]``
holds the same keys as ``init`` returns.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._core import VJP, Hypers, Interval, group_float, reduce_to

InitFn = Callable[[Tensor, dict[str, Any]], dict[str, Tensor]]
StepFn = Callable[[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]],
                  tuple[Tensor, dict[str, Tensor]]]
VjpFn = Callable[..., tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]]


class CustomRule:
    """A gimli optimizer rule made of a user's per-tensor functions."""

    def __init__(self, hypers: Sequence[str], init: InitFn, step: StepFn, vjp: VjpFn | None = None,
                 group_keys: Mapping[str, tuple[str, int]] | None = None,
                 ranges: Mapping[str, Interval] | None = None):
        self.HYPERS = tuple(hypers)
        self.GROUP_KEYS = dict(group_keys or {})
        self.RANGES = dict(ranges or {})
        self._init, self._step, self._vjp = init, step, vjp
        self._types: dict[tuple[str, ...], Any] = {}
        if vjp is not None:
            self.vjp = self._closed_form_vjp

    def _state_type(self, keys: Sequence[str]) -> Any:
        key = tuple(sorted(keys))
        if key not in self._types:
            self._types[key] = namedtuple("State", key)
        return self._types[key]

    def read_group(self, group: dict[str, Any]) -> tuple[None, dict[str, float]]:
        values = {}
        for name in self.HYPERS:
            key, index = self.GROUP_KEYS.get(name, (name, None))
            values[name] = group_float(group, key, index)
        return None, values

    def read_state(self, torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> Any:
        state = dict(torch_state) if torch_state else self._init(param, group)
        state = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}
        kind = self._state_type(list(state))
        return kind(*([state[k]] for k in kind._fields))

    def write_state(self, state: Any, i: int) -> dict[str, Any]:
        return {k: field[i] for k, field in zip(state._fields, state)}

    def step(self, flags: None, params: list[Tensor], state: Any, grads: list[Tensor],
             hp: Hypers) -> tuple[list[Tensor], Any]:
        new_params, new_states = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            p, s = self._step(p, self.write_state(state, i), g, {k: v[i] for k, v in hp.items()})
            new_params.append(p)
            new_states.append(s)
        kind = self._state_type(list(new_states[0]))
        return new_params, kind(*([s[k] for s in new_states] for k in kind._fields))

    def _closed_form_vjp(self, flags: None, params: list[Tensor], state: Any, grads: list[Tensor],
                         hp: Hypers, cot_params: list[Tensor], cot_state: Any,
                         need: frozenset[str]) -> VJP:
        assert self._vjp is not None
        b, o, s_bar = [], [], []
        a: Hypers = {name: [] for name in need}
        for i, (p, g, P) in enumerate(zip(params, grads, cot_params)):
            hp_i = {k: v[i] for k, v in hp.items()}
            p_bar, st_bar, g_bar, hp_bar = self._vjp(p, self.write_state(state, i), g, hp_i, P,
                                                     self.write_state(cot_state, i))
            b.append(p_bar)
            o.append(g_bar)
            s_bar.append(st_bar)
            for name in need:
                a[name].append(reduce_to(hp_bar[name], hp_i[name]) if name in hp_bar
                               else torch.zeros_like(hp_i[name]))
        fields = type(state)._fields
        return VJP(b, type(state)(*([sb.get(k) for sb in s_bar] for k in fields)), o, a)
