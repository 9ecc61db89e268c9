"""Several ``torch.optim`` optimizers seen as one: :class:`Joint`.

A training loop that steps, say, Muon on the 2-D weights and AdamW on the rest
calls ``step()`` on each; one unroll step of gimli is the same: each tensor is
updated by the optimizer that holds it, from its own gradient and state. The
joint view lays the optimizers' param groups end to end (the first optimizer's
groups first) and routes each tensor's state to the optimizer that owns it, so
that everything gimli reads or writes through ``param_groups`` and ``state``
(commit, checkpoints, a failed step's rollback) reaches the user's own
optimizers, whose objects and groups stay their own.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor


class JointState(MutableMapping[Tensor, Any]):
    """``state[p]`` of the optimizer that holds ``p``; iterating goes over every
    optimizer's state in turn. Reading an absent entry creates nothing (``get``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self._optimizers = optimizers
        self._owner = {id(p): opt for opt in optimizers for g in opt.param_groups for p in g["params"]}

    def _of(self, p: Tensor) -> Any:
        opt = self._owner.get(id(p))
        if opt is None:
            raise KeyError(p)
        return opt.state

    def __getitem__(self, p: Tensor) -> Any:
        return self._of(p)[p]

    def get(self, p: Tensor, default: Any = None) -> Any:
        opt = self._owner.get(id(p))
        return default if opt is None else opt.state.get(p, default)

    def __contains__(self, p: object) -> bool:
        opt = self._owner.get(id(p))
        return opt is not None and p in opt.state

    def __setitem__(self, p: Tensor, value: Any) -> None:
        self._of(p)[p] = value

    def __delitem__(self, p: Tensor) -> None:
        del self._of(p)[p]

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)

    def clear(self) -> None:
        for opt in self._optimizers:
            opt.state.clear()


class Joint:
    """Several optimizers over disjoint sets of tensors, as one: ``param_groups`` is
    their groups end to end (the very dicts), ``state`` routes each tensor to its
    owner. Built by gimli from the list a user passes as ``opt``; not an optimizer of
    its own (it has no ``step``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> JointState:
        return JointState(self.optimizers)

    def __repr__(self) -> str:
        return f"Joint({', '.join(type(o).__name__ for o in self.optimizers)})"


def joint(optimizer: Any) -> Any:
    """A list or tuple of optimizers as one :class:`Joint` (one optimizer: itself);
    anything else unchanged."""
    if isinstance(optimizer, (list, tuple)):
        optimizers = list(optimizer)
        if not optimizers:
            raise ValueError("opt is an empty list: give the inner optimizer, or a list of them")
        bad = [type(o).__name__ for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
        if bad:
            raise TypeError(f"opt: every entry of the list must be a torch.optim optimizer, not "
                            f"{bad[0]}")
        if len({id(o) for o in optimizers}) != len(optimizers):
            raise ValueError("opt: the same optimizer appears twice in the list")
        return optimizers[0] if len(optimizers) == 1 else Joint(optimizers)
    return optimizer


def parts(optimizer: Any) -> list[Any]:
    """The user's optimizers behind ``optimizer`` (a :class:`Joint`, or one)."""
    return optimizer.optimizers if isinstance(optimizer, Joint) else [optimizer]


_UNIONS: dict[tuple[str, ...], type] = {}


def joint_state_type(types: Sequence[type]) -> type:
    """The State of several rules at once: every field of each (in order of first
    appearance), one class per set of fields (so that equal unions are one type)."""
    fields = tuple(dict.fromkeys(f for t in types for f in getattr(t, "_fields")))
    if fields not in _UNIONS:
        _UNIONS[fields] = namedtuple("UnionState", fields)
    return _UNIONS[fields]
