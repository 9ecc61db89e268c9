"""User-defined optimizers: per-tensor pure functions turned into a gimli :class:`gimli.optim.Rule`.

The user supplies, for one parameter tensor,

* ``init(param, group) -> dict[str, Tensor]``: the state ``torch.optim`` would
  create before the first step;
* ``step(param, state, grad, hp) -> (param, state)``: the pure update, with
  ``hp`` the hyperparameters by name (0-dim or parameter-shaped tensors);
* optionally ``vjp(param, state, grad, hp, cot_param, cot_state) ->
  (param_bar, state_bar, grad_bar, hp_bar)``: its closed-form VJP. Without it
  the engine takes the four cotangents by autograd on that one step, still
  inside the hand-written sweep (``_rule.autograd_vjp``).

``register_optimizer`` ties these to the user's own ``torch.optim.Optimizer``
subclass, whose param groups hold the hyperparameters and whose ``state[p]``
holds the same keys as ``init`` returns. The state dict of one tensor becomes a
``State`` namedtuple with one field per key (sorted), one value per field, as the
rule protocol (``_rule.py``) wants. A user's update is not known to act element by
element, so the rule runs tensor by tensor (``elementwise=False``).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._core import VJP, Interval, group_float
from ._rule import Rule

InitFn = Callable[[Tensor, dict[str, Any]], dict[str, Tensor]]
StepFn = Callable[[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]],
                  tuple[Tensor, dict[str, Tensor]]]
VjpFn = Callable[..., tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]]


class CustomRule(Rule):
    """A gimli :class:`gimli.optim.Rule` made of a user's per-tensor functions."""

    def __init__(self, hypers: Sequence[str], init: InitFn, step: StepFn, vjp: VjpFn | None = None,
                 group_keys: Mapping[str, tuple[str, int]] | None = None,
                 ranges: Mapping[str, Interval] | None = None):
        names = tuple(hypers)
        keys = dict(group_keys or {})
        types: dict[tuple[str, ...], Any] = {}

        def state_type(fields: Sequence[str]) -> Any:
            """One namedtuple type per set of state keys (sorted), shared by all tensors."""
            key = tuple(sorted(fields))
            if key not in types:
                types[key] = namedtuple("State", key)
            return types[key]

        def as_dict(state: Any) -> dict[str, Any]:
            return dict(zip(state._fields, state))

        def read_group(group: dict[str, Any]) -> tuple[None, dict[str, float]]:
            values = {}
            for name in names:
                key, index = keys.get(name, (name, None))
                values[name] = group_float(group, key, index)
            return None, values

        def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> Any:
            state = dict(torch_state) if torch_state else init(param, group)
            state = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}
            kind = state_type(list(state))
            return kind(*(state[k] for k in kind._fields))

        def rule_step(flags: None, p: Tensor, s: Any, g: Tensor,
                      hp: dict[str, Tensor]) -> tuple[Tensor, Any]:
            new_p, new = step(p, as_dict(s), g, hp)
            if set(new) != set(s._fields):
                raise ValueError(f"the registered step returned state keys {sorted(new)}, but the "
                                 f"optimizer's state (init) has {sorted(s._fields)}: step must "
                                 f"return the same keys")
            return new_p, type(s)(*(new[k] for k in s._fields))

        def rule_vjp(flags: None, p: Tensor, s: Any, g: Tensor, hp: dict[str, Tensor], P: Tensor,
                     S: Any, need: frozenset[str]) -> VJP:
            assert vjp is not None
            # a state cotangent the sweep has none for is 0 (the user's vjp reads tensors)
            cot = {k: torch.zeros_like(x) if c is None and isinstance(x, Tensor)
                   and x.is_floating_point() else c for k, x, c in zip(s._fields, s, S)}
            p_bar, s_bar, g_bar, hp_bar = vjp(p, as_dict(s), g, hp, P, cot)
            # b_j is the caller's to add to in place (InnerOptimizer.vjp): a user's vjp may
            # return one of its inputs as it is
            return VJP(p_bar.clone(), type(s)(*(s_bar.get(k) for k in s._fields)), g_bar,
                       {name: hp_bar[name] for name in need if name in hp_bar})

        super().__init__(hypers=names, ranges=dict(ranges or {}), read_group=read_group,
                         read_state=read_state, step=rule_step,
                         vjp=None if vjp is None else rule_vjp, write_state=as_dict,
                         elementwise=False, group_keys=keys)
