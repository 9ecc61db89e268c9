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
each hyperparameter's cotangent summed back to that tensor's own shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

Hypers = dict[str, list[Tensor]]


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
