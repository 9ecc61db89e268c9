"""What every differentiable optimizer shares: the VJP record and small helpers.

An optimizer module (``sgd.py``, ``adam.py``, ...) is a set of pure functions
over lists of tensors, one entry per parameter tensor of one param group:

* ``read_group(group) -> (Flags, hypers)``: the static flags and the numeric
  hyperparameters of a ``torch.optim`` param group;
* ``read_state(torch_state, param, group) -> State`` entries for one tensor;
* ``step(flags, params, state, grads, hp) -> (params, state)``: one update;
* ``vjp(flags, params, state, grads, hp, cot_params, cot_state, need) -> VJP``:
  the four cotangents of docs/design.md §2 at the same point.

``hp`` maps each hyperparameter name to a list (one tensor per parameter) of
0-dim or parameter-shaped tensors; the step broadcasts them and ``vjp`` returns
each hyperparameter's cotangent summed back to that tensor's own shape. A rule
may compute over the whole list at once with ``_lists.Tensors`` (one foreach
call per operation; SGD and Adam do) or loop over the tensors.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

Hypers = dict[str, list[Tensor]]

# Optional attributes of an optimizer module:
#   GROUP_KEYS: dict[str, tuple[str, int]]  hyperparameter kept inside a param-group tuple
#       (Adam's "beta1" is group["betas"][0]);
#   GRANULARITIES: dict[str, tuple[str, ...]]  granularities a hyperparameter allows where
#       not all four make sense (a Newton–Schulz coefficient acts on a whole matrix);
#   inactive_hypers(flags) -> dict[str, str]  hyperparameters that cannot be meta-learned
#       under these flags, name → why, a phrase following the name ("has no effect there:
#       …" for SGD's momentum at 0; "cannot be meta-learned there: …" for a value the
#       constructor pins, as SGD's dampening under Nesterov);
#   STRAIGHT_THROUGH: str  the step rounds inside (Muon's bfloat16 Newton–Schulz) and is
#       differentiated straight through: why finite differences of L^val cannot check it;
#   RANGES: dict[str, Interval]  each hyperparameter's valid values, exactly as the
#       torch.optim constructor checks them (a learned value is kept inside: _meta.py);
#   ranges(flags) -> dict[str, Interval]  the same where flags narrow it (a momentum
#       built ≠ 0 must stay > 0, or torch.optim would stop keeping its buffer);
#   SCALAR_STATE: dict[str, str]  hyperparameter → the state entry torch.optim keeps as
#       one number per tensor that it shapes (NAdam's mu_product): learned per element,
#       the state is per element and commit=True is refused (InnerOptimizer.check_commit);
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


def stored_as_torch(params: list[Tensor], state: Any, new_params: list[Tensor],
                    new_state: Any) -> tuple[list[Tensor], Any]:
    """A step's θ' and state in the dtypes ``torch.optim`` stores them in: θ' in its
    parameter's dtype, a state entry in the dtype it came in (one created by this step,
    as SGD's first buffer, in its parameter's, unless 0-dim like ASGD's η).

    The explicit guard for reduced-precision models (``InnerOptimizer.step`` applies it to
    every rule): their hyperparameters are float32 (``hyper_dtype``), and one that has
    the parameter's shape (learned per element; Rprop's first step size) would promote a
    bfloat16 θ' to float32. The update is thus computed at the hyperparameters' precision
    and stored at the parameter's, as ``torch.optim``'s ops do with a Python-float
    hyperparameter. The cast is the identity everywhere else; its derivative is the
    identity (the VJPs need no change)."""
    new_params = [_like(t, p.dtype) for t, p in zip(new_params, params)]
    fields = [[_like(x, old.dtype if isinstance(old, Tensor) else
                     p.dtype if isinstance(x, Tensor) and x.dim() > 0 else None)
               for x, old, p in zip(new_field, old_field, params)]
              if isinstance(old_field, list) else new_field
              for new_field, old_field in zip(new_state, state)]
    return new_params, type(new_state)(*fields)


def swept_wide(params: list[Tensor], state: Any, grads: list[Tensor], cot_params: list[Tensor],
               cot_state: Any) -> tuple[list[Tensor], Any, list[Tensor], list[Tensor], Any]:
    """A closed-form VJP's tensor arguments in the hyperparameters' dtype: for a
    reduced-precision model, θ, the state, G and the cotangents are cast to float32
    (``hyper_dtype``; ``InnerOptimizer.vjp`` applies it to every rule), so the cotangents
    it returns are float32 (autograd casts them back where the sweep hands them to G_j's
    graph). It is the derivative of the same step at the same point, computed without
    bfloat16's rounding or float16's range (Adafactor's 1/q^{3/2} overflows float16 where
    torch.optim's own float16 step is fine). The identity for float32 and float64 models."""
    return _wide(params), _wide_state(state), _wide(grads), _wide(cot_params), _wide_state(cot_state)


def _wide(xs: list[Any]) -> list[Any]:
    return [_like(x, hyper_dtype(x.dtype)) if isinstance(x, Tensor) else x for x in xs]


def _wide_state(state: Any) -> Any:
    return type(state)(*(_wide(field) if isinstance(field, list) else field for field in state))


def _like(x: Any, dtype: torch.dtype | None) -> Any:
    if not isinstance(x, Tensor) or dtype is None or x.dtype == dtype or not x.is_floating_point():
        return x
    return x.to(dtype)


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
