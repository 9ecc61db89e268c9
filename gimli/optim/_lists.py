"""Arithmetic on a list of tensors at once: one ``torch._foreach_*`` call per operation.

An optimizer step or VJP is the same few elementwise formulas applied to every
parameter tensor of a group. Written per tensor in Python, each formula costs
one dispatch per tensor; written over a :class:`Tensors` it costs one foreach
dispatch for the whole list (one fused kernel launch per operation on a GPU,
where ``torch.optim`` takes the same route by default). Operands combine
elementwise, position by position, and may be

* another :class:`Tensors` of the same length (a hyperparameter's per-tensor
  values are one: 0-dim tensors broadcast against their tensor), or
* a Python number, the same for every position, or a list of Python numbers,
  one per position.

Foreach operations are differentiable, so the oracle's autograd unroll goes
through the very same code. Operations that have no foreach kernel (``where``,
comparisons, reductions) fall back to a Python loop and say so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Union

import torch
from torch import Tensor

Operand = Union["Tensors", float, int, Sequence[float]]
# a Sequence[float] is one number per position (torch's ScalarList)


class Tensors:
    """An immutable list of tensors with elementwise, per-position arithmetic."""

    __slots__ = ("ts",)

    def __init__(self, ts: Sequence[Tensor]):
        self.ts = list(ts)

    def __len__(self) -> int:
        return len(self.ts)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.ts)

    def __getitem__(self, i: int) -> Tensor:
        return self.ts[i]

    # --- foreach arithmetic -----------------------------------------------------------
    def __add__(self, other: Operand) -> Tensors:
        return Tensors(torch._foreach_add(self.ts, _arg(other)))

    __radd__ = __add__

    def __sub__(self, other: Operand) -> Tensors:
        return Tensors(torch._foreach_sub(self.ts, _arg(other)))

    def __rsub__(self, other: float) -> Tensors:
        return Tensors(torch._foreach_add(torch._foreach_neg(self.ts), other))

    def __mul__(self, other: Operand) -> Tensors:
        return Tensors(torch._foreach_mul(self.ts, _arg(other)))

    __rmul__ = __mul__

    def __truediv__(self, other: Operand) -> Tensors:
        return Tensors(torch._foreach_div(self.ts, _arg(other)))

    def __rtruediv__(self, other: float) -> Tensors:
        return Tensors(torch._foreach_mul(torch._foreach_reciprocal(self.ts), other))

    def __neg__(self) -> Tensors:
        return Tensors(torch._foreach_neg(self.ts))

    def __pow__(self, other: Operand) -> Tensors:
        return Tensors(torch._foreach_pow(self.ts, _arg(other)))

    def __rpow__(self, other: float) -> Tensors:
        return Tensors(torch._foreach_pow(other, self.ts))

    def sqrt(self) -> Tensors:
        return Tensors(torch._foreach_sqrt(self.ts))

    def maximum(self, other: Tensors) -> Tensors:
        return Tensors(torch._foreach_maximum(self.ts, other.ts))

    def addcmul(self, a: Tensors, b: Tensors, value: Tensors | float = 1.0) -> Tensors:
        """self + value·a·b in one call."""
        if isinstance(value, Tensors):
            return self + value * a * b
        return Tensors(torch._foreach_addcmul(self.ts, a.ts, b.ts, value=value))

    # --- per-tensor fallbacks (no foreach kernel) ----------------------------------------
    def map(self, fn: Callable[..., Tensor], *others: Tensors) -> Tensors:
        """``fn`` applied position by position to this list and ``others``."""
        return Tensors([fn(*xs) for xs in zip(self.ts, *(o.ts for o in others))])

    def sum_to(self, likes: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor summed back to the shape of the matching hyperparameter value."""
        return [x if x.shape == like.shape else x.sum_to_size(like.shape)
                for x, like in zip(self.ts, likes)]


def _arg(other: Operand) -> list[Tensor] | float | int | Sequence[float]:
    return other.ts if isinstance(other, Tensors) else other


def tensors(xs: Sequence[Tensor]) -> Tensors:
    """Wrap a list of tensors (for instance a hyperparameter's per-tensor values)."""
    return Tensors(xs)
