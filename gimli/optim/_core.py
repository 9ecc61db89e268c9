"""What every differentiable optimizer shares: the VJP record and small helpers.

An optimizer module (``sgd.py``, ``adam.py``, ...) is a set of pure functions
over lists of tensors, one entry per parameter tensor of one param group:

* ``read_group(group) -> (Flags, hypers)``: the static flags and the numeric
  hyperparameters of a ``torch.optim`` param group;
* ``read_state(torch_state, param, group) -> State`` entries for one tensor;
* ``step(flags, params, state, grads, hp) -> (params, state)``: one update;
* ``vjp(flags, params, state, grads, hp, cot_params, cot_state, need) -> VJP``:
  the four cotangents of DESIGN.md §2 at the same point.

``hp`` maps each hyperparameter name to a list (one tensor per parameter) of
0-dim or parameter-shaped tensors; the step broadcasts them and ``vjp`` returns
each hyperparameter's cotangent summed back to that tensor's own shape. A rule
may compute over the whole list at once with ``_lists.Tensors`` (one foreach
call per operation; SGD and Adam do) or loop over the tensors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

Hypers = dict[str, list[Tensor]]

# Optional attributes of an optimizer module:
#   GROUP_KEYS: dict[str, tuple[str, int]]  hyperparameter kept inside a param-group tuple
#       (Adam's "beta1" is group["betas"][0]);
#   GRANULARITIES: dict[str, tuple[str, ...]]  granularities a hyperparameter allows where
#       not all four make sense (a Newton–Schulz coefficient acts on a whole matrix);
#   inactive_hypers(flags) -> frozenset[str]  hyperparameters with no effect under these
#       flags (its docstring says why, for the error message);
#   NO_HYPERGRADIENT: dict[str, str]  hyperparameters that never reach θ, so a loss on θ
#       has no hypergradient for them (name → why); not offered as meta-parameters;
#   INSENSITIVE_TO_G: str  the update does not depend differentiably on G (why), so φ^loss
#       reaches θ through no step (Rprop); a warning when φ^loss is learned;
#   substep(state, i) -> Hashable  splits a group's tensors into calls of uniform tensors
#       (SGD: a tensor that has no momentum buffer yet steps apart from those that do).


class VJP(NamedTuple):
    """Cotangents of one optimizer step, given (B_{j+1}, S_{j+1}).

    ``params`` is b_j (direct path through θ), ``state`` is S_j (the state
    adjoint, a ``State`` of the optimizer with ``None`` where an entry has no
    tensor), ``grads`` is o_j = B_{j+1}·O_j, ``hypers`` is a_j for each
    hyperparameter asked for.
    """

    params: list[Tensor]
    state: Any
    grads: list[Tensor]
    hypers: Hypers


def reduce_to(x: Tensor, like: Tensor) -> Tensor:
    """Sum a per-element contribution back to a hyperparameter's own shape."""
    return x if x.shape == like.shape else x.sum_to_size(like.shape)


def group_float(group: dict[str, Any], key: str, index: int | None = None) -> float:
    """A numeric param-group entry as a Python float (entries may be tensors)."""
    value = group[key] if index is None else group[key][index]
    return float(value)


def step_count(torch_state: dict[str, Any]) -> int:
    """The number of steps ``torch.optim`` has already taken for one tensor."""
    return int(torch_state["step"]) if "step" in torch_state else 0


def _tensor_slots(state: Any) -> list[tuple[int, int]]:
    """(field, index) of every tensor entry of a State."""
    return [(f, i) for f, field in enumerate(state) for i, x in enumerate(field)
            if isinstance(x, Tensor) and x.is_floating_point()]


def autograd_vjp(step: Any, flags: Any, params: list[Tensor], state: Any, grads: list[Tensor],
                 hp: Hypers, cot_params: list[Tensor], cot_state: Any, need: frozenset[str]) -> VJP:
    """The four cotangents of one optimizer ``step`` by autograd on that single step.

    For rules that supply no closed-form ``vjp`` (user-defined and learned
    optimizers): it stays local to step j, inside the hand-written sweep.
    """
    with torch.enable_grad():
        params = [p.detach().requires_grad_() for p in params]
        grads = [g.detach().requires_grad_() for g in grads]
        slots = _tensor_slots(state)
        state = type(state)(*(list(field) for field in state))
        for f, i in slots:
            state[f][i] = state[f][i].detach().requires_grad_()
        hp = {k: [v.detach().requires_grad_() if k in need else v for v in vs] for k, vs in hp.items()}
        new_params, new_state = step(flags, params, state, grads, hp)
        out_slots = [(f, i) for f, i in _tensor_slots(new_state)
                     if isinstance(cot_state[f][i], Tensor)]
        outputs = list(new_params) + [new_state[f][i] for f, i in out_slots]
        cots = list(cot_params) + [cot_state[f][i] for f, i in out_slots]
        keep = [k for k, out in enumerate(outputs) if out.requires_grad]
        inputs = params + [state[f][i] for f, i in slots] + grads \
            + [v for name in sorted(need) for v in hp[name]]
        raw: tuple[Tensor | None, ...] = (None,) * len(inputs)
        if keep:
            raw = torch.autograd.grad([outputs[k] for k in keep], inputs, [cots[k] for k in keep],
                                      allow_unused=True)
    found = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, inputs)]
    n, s = len(params), len(slots)
    state_bar = type(state)(*([None] * len(field) for field in state))
    for (f, i), g in zip(slots, found[n:n + s]):
        state_bar[f][i] = g
    hyper_bars = iter(found[n + s + n:])
    return VJP(found[:n], state_bar, found[n + s:n + s + n],
               {name: [next(hyper_bars) for _ in hp[name]] for name in sorted(need)})
