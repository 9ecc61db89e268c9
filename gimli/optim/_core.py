"""What every optimizer rule shares: the VJP record, valid ranges, dtypes and small
helpers. The protocol itself (a rule's step and VJP for one tensor, and how the engine
runs them over a param group's tensors) is ``_rule.py``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

# per tensor; with several optimizers a tensor whose optimizer has no such name holds None
# there (InnerOptimizer gives each rule call only its own names)
Hypers = dict[str, list[Tensor]]

class VJP(NamedTuple):
    """Cotangents of one optimizer step, given (B_{j+1}, S_{j+1}).

    ``params`` is b_j (direct path through θ), ``state`` is S_j (the state
    adjoint, a ``State`` of the optimizer with ``None`` where an entry has no
    tensor), ``grads`` is o_j = B_{j+1}·O_j, ``hypers`` is a_j for each
    hyperparameter asked for. A rule returns them for one tensor (a hyperparameter's
    cotangent per element, or ``None`` where it has none); ``InnerOptimizer.vjp``
    returns them as lists, one entry per parameter tensor.
    """

    params: Any
    state: Any
    grads: Any
    hypers: dict[str, Any]


class Interval(NamedTuple):
    """The valid values of a hyperparameter: from ``lo`` to ``hi``, each end open or closed
    (an infinite end is open). ``Interval()`` is the whole real line."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, (int, float)) or math.isnan(x) or math.isinf(x):
            return False
        return (self.lo < x if self.lo_open else self.lo <= x) and \
            (x < self.hi if self.hi_open else x <= self.hi)

    def covers(self, other: Interval) -> bool:
        """Whether every value of ``other`` is in this interval."""
        lo_ok = self.lo < other.lo or (self.lo == other.lo and (other.lo_open or not self.lo_open))
        hi_ok = other.hi < self.hi or (self.hi == other.hi and (other.hi_open or not self.hi_open))
        return lo_ok and hi_ok

    def __and__(self, other: Interval) -> Interval:
        lo = max(self, other, key=lambda i: (i.lo, i.lo_open))
        hi = min(self, other, key=lambda i: (i.hi, not i.hi_open))
        return Interval(lo.lo, hi.hi, lo.lo_open, hi.hi_open)

    def representable(self, dtype: torch.dtype) -> tuple[float, float]:
        """The smallest and largest finite values of ``dtype`` inside: a closed end
        itself, an open one the next representable value inward (so a β < 1 kept in
        float32 is at most 1 − 2⁻²⁴, never a value that rounds to 1)."""
        big = torch.finfo(dtype).max
        lo, hi = max(self.lo, -big), min(self.hi, big)
        if self.lo_open and lo == self.lo:
            lo = _next(lo, math.inf, dtype)
        if self.hi_open and hi == self.hi:
            hi = _next(hi, -math.inf, dtype)
        return lo, hi

    def __str__(self) -> str:
        def end(x: float) -> str:
            return ("−∞" if x < 0 else "∞") if math.isinf(x) else f"{x:g}"
        return f"{'(' if self.lo_open or math.isinf(self.lo) else '['}{end(self.lo)}, " \
               f"{end(self.hi)}{')' if self.hi_open or math.isinf(self.hi) else ']'}"


def _next(x: float, toward: float, dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(toward, dtype=dtype)))


REAL = Interval()                                       # not checked by the constructor
NONNEGATIVE = Interval(0.0)                             # "if not 0.0 <= x: raise"
POSITIVE = Interval(0.0, lo_open=True)
BETA = Interval(0.0, 1.0, hi_open=True)                 # "if not 0.0 <= beta < 1.0: raise"


# Adam's family (Adam, AdamW, Adamax, NAdam, RAdam): the ranges their constructors check
# (0 ≤ β < 1, the rest ≥ 0), and where their param groups keep the βs
ADAM_RANGES = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
               "weight_decay": NONNEGATIVE}
BETAS_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}


def scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` keeps its 0-dim state in (``step``, NAdam's
    ``mu_product``, ASGD's ``eta``, ``mu``): ``torch.optim.optimizer._get_scalar_dtype``."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_tensor(count: int) -> Tensor:
    """A tensor's step count as ``torch.optim`` keeps it in its state."""
    return torch.tensor(float(count), dtype=scalar_dtype())


def hyper_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gimli keeps hyperparameters in for parameters of ``dtype``: their own
    dtype, but at least float32. ``torch.optim`` keeps hyperparameters as Python floats,
    so a bfloat16 model still steps with β₂ = 0.999 (which bfloat16 rounds to 1)."""
    return dtype if dtype in (torch.float32, torch.float64) or not dtype.is_floating_point \
        else torch.float32


def group_float(group: dict[str, Any], key: str, index: int | None = None) -> float:
    """A numeric param-group entry as a Python float (entries may be tensors)."""
    value = group[key] if index is None else group[key][index]
    return float(value)


def step_count(torch_state: dict[str, Any]) -> int:
    """The number of steps ``torch.optim`` has already taken for one tensor."""
    return int(torch_state["step"]) if "step" in torch_state else 0
