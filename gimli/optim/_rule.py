"""The rule protocol: what an optimizer file gives gimli, and how gimli runs it.

Each optimizer file writes its mathematics once, for **one** tensor:

* ``step(flags, p, state, g, hp) -> (p', state')``: the update of ``torch.optim``,
  pure. ``state`` is the file's ``State`` with one value per field (a tensor,
  ``None``, or a Python int such as ``step``); ``hp`` maps each hyperparameter
  to a tensor that broadcasts against ``p`` (0-dim, or ``p``'s shape), or to a Python
  float (0.0 for a name in ``skips_zero``, the param group's number for one in
  ``floats``);
* ``vjp(flags, p, state, g, hp, P, S, need) -> VJP``: the four cotangents of
  docs/design.md §2 at the same point, given P = B_{j+1} and S = S_{j+1} (a
  ``State`` whose fields are cotangents or ``None``). A hyperparameter's
  cotangent may be returned per element (``p``'s shape): gimli sums it to the
  hyperparameter's own shape. A rule marked ``reads_after`` also takes
  ``after=``, the ``State`` its step produced at that point (σ_{j+1}, which the
  sweep holds anyway), and may read its new moments there instead of
  recomputing them (Adam).

and describes itself in a :class:`Rule`: its hyperparameters, their valid
ranges and granularities, how to read a param group and a tensor's state.

**The multi-tensor path.** A rule marked ``elementwise`` (its update of an
element reads only that element's θ, G and state, and the hyperparameters) runs
once per param-group call over the *concatenation* of the call's tensors: one
flat tensor per argument, one dispatch per operation whatever the number of
tensors (:class:`Segments`). A hyperparameter that is one number per tensor
(or a state entry that ``torch.optim`` keeps as one number per tensor, NAdam's
``mu_product``) is spread over its tensor's elements, and its cotangent summed
back per tensor. Rules that act on a whole matrix (Adafactor's factored second
moment, Muon's orthogonalization) run tensor by tensor through the same
functions.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from ._core import VJP, Interval, hyper_dtype, step_tensor
from ._pieces import NO_DECAY

StepFn = Callable[[Any, Tensor, Any, Tensor, dict[str, Tensor]], tuple[Tensor, Any]]
VjpFn = Callable[[Any, Tensor, Any, Tensor, dict[str, Tensor], Tensor, Any, frozenset[str]], VJP]
GRANULARITIES = ("scalar", "group", "tensor", "element")


@dataclass(frozen=True)
class Rule:
    """One optimizer's differentiable update and the facts gimli asks about it.

    ``read_group(group) -> (flags, hypers)``: the static flags (hashable) and the
    numeric hyperparameters of a ``torch.optim`` param group (Python floats, or a
    module for a learned optimizer's network). ``read_state(torch_state, param,
    group) -> State``: one tensor's state, copied. ``write_state(state) -> dict``:
    the inverse (default: the ``State``'s fields under their own names, ``step`` as
    ``torch.optim``'s float tensor, ``None`` entries left out).
    """

    hypers: tuple[str, ...]
    ranges: Mapping[str, Interval]                  # as the torch.optim constructor checks them
    read_group: Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]]
    read_state: Callable[[dict[str, Any], Tensor, dict[str, Any]], Any]
    step: StepFn
    vjp: VjpFn | None = None                        # None: autograd on the single step
    write_state: Callable[[Any], dict[str, Any]] | None = None
    elementwise: bool = True                        # runs on the concatenation of a call's tensors
    # a hyperparameter kept inside a param-group tuple (Adam's "beta1" is group["betas"][0])
    group_keys: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # granularities a hyperparameter allows where not all four make sense
    granularities: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # flags -> {name: why}: hyperparameters that cannot be meta-learned under these flags
    # (a phrase following the name: "has no effect there: …", "cannot be meta-learned there: …")
    inactive: Callable[[Any], dict[str, str]] | None = None
    # flags -> ranges narrowed by the flags (a momentum built ≠ 0 must stay > 0)
    narrowed: Callable[[Any], Mapping[str, Interval]] | None = None
    # the step rounds inside and is differentiated straight through: why finite
    # differences of L^val cannot check it (Muon's bfloat16 Newton–Schulz)
    straight_through: str = ""
    # hyperparameter -> the state entry torch.optim keeps as one number per tensor that it
    # shapes (NAdam's mu_product): learned per element, that entry is per element too
    scalar_state: Mapping[str, str] = field(default_factory=dict)
    # hyperparameters that never reach θ (name -> why); not offered as meta-parameters
    no_hypergradient: Mapping[str, str] = field(default_factory=dict)
    # the update does not depend differentiably on G (why): φ^loss reaches θ through no step
    insensitive_to_g: str = ""
    # (flags, need) -> whether its vjp reads G for the cotangents in need; where not, a flat call
    # passes g=None and joins no G (SGD's reads it only for those of γ, τ and μ). None: always
    reads_grad: Callable[[Any, frozenset[str]], bool] | None = None
    # its vjp takes ``after=``, the State the step produced (σ_{j+1}, which the sweep holds
    # anyway), and reads the new moments there instead of recomputing them
    reads_after: bool = False
    # hyperparameters it takes as the float 0.0 (``_pieces.NO_DECAY``) where they are the
    # constant 0, not learned, and then skips, as torch.optim does (its weight decay)
    skips_zero: tuple[str, ...] = ()
    # hyperparameters its step and vjp also take as a Python float, which the multi-tensor
    # path passes where the value is a param group's number (not learned, not scheduled):
    # torch.optim's own arithmetic on it, and no 0-dim tensor operation per step
    floats: tuple[str, ...] = ()
    # (State, hypers) -> {name: value}: numbers its step and vjp read that depend on the
    # step count but on no element (Adam's bias corrections 1 − β^t), formed before a
    # compiled call (in double precision: _runner) and passed in among the hypers under these
    # names: with the step count symbolic, a compiled kernel would form them again for every
    # few elements
    scalars: Callable[[Any, dict[str, Any]], dict[str, Tensor]] | None = None

    def ranges_for(self, flags: Any) -> Mapping[str, Interval]:
        """Each hyperparameter's valid values for a group built with these flags."""
        return self.ranges if self.narrowed is None else self.narrowed(flags)

    def inactive_hypers(self, flags: Any) -> dict[str, str]:
        return {} if self.inactive is None else self.inactive(flags)

    def granularities_of(self, name: str) -> tuple[str, ...]:
        return tuple(self.granularities.get(name, GRANULARITIES))

    def group_key(self, name: str) -> tuple[str, int | None]:
        """Where a param group keeps hyperparameter ``name``: (key, index in a tuple or None)."""
        key, index = self.group_keys.get(name, (name, None))
        return key, index

    def state_entry(self, state: Any) -> dict[str, Any]:
        """One tensor's ``State`` as a ``torch.optim`` state entry."""
        if self.write_state is not None:
            return dict(self.write_state(state))
        out: dict[str, Any] = {}
        for key, value in zip(type(state)._fields, state):
            if key == "step":
                out[key] = step_tensor(int(value))
            elif value is not None:
                out[key] = value
        return out


# --- one call's tensors as one flat tensor ------------------------------------------------
class Laid(list[Tensor]):
    """Per-tensor views of one flat tensor, with that flat tensor: what
    :meth:`Segments.split` returns, so that joining them again costs nothing. The unroll
    passes these lists from one call to the next (θ'_j, σ_j), so a step joins none of
    them (the sweep passes B_j and S_j as :class:`Flat`, without views). Replacing an
    entry drops the flat tensor (it no longer holds the list's values); changing an entry
    in place changes the flat tensor with it."""

    __slots__ = ("flat", "seg")

    def __init__(self, views: Any, flat: Tensor | None, seg: Any):
        super().__init__(views)
        self.flat: Tensor | None = flat
        self.seg = seg


def _drops_flat(name: str) -> Any:
    def method(self: Laid, *args: Any) -> Any:
        self.flat = None
        return getattr(list, name)(self, *args)
    method.__name__ = name
    return method


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert",
              "pop", "remove", "reverse", "sort", "clear"):
    setattr(Laid, _name, _drops_flat(_name))


def laid_like(values: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """``values`` (tensors in the same memory as ``like``'s, e.g. leaves made from its
    entries by ``detach``) as a :class:`Laid` list over ``like``'s flat tensor, detached;
    as a plain list if ``like`` is not laid."""
    if isinstance(like, Laid) and like.flat is not None:
        return Laid(values, like.flat.detach(), like.seg)
    return values


class Segments:
    """The tensors of one rule call laid end to end: ``join`` concatenates per-tensor
    values into one flat tensor, ``split`` cuts a flat result back, ``spread`` turns
    one number per tensor into one per element and ``sums`` is its adjoint.

    ``join`` reads values that already lie end to end (a :class:`Laid` list, or views
    that happen to be consecutive in one storage) without a copy."""

    def __init__(self, params: list[Tensor]):
        self.shapes = tuple(p.shape for p in params)
        self.sizes = tuple(p.numel() for p in params)
        self.total = sum(self.sizes)
        self.k = len(params)
        like = params[0]
        self.device, self.dtype = like.device, like.dtype
        offsets = [0]
        for n in self.sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.offsets = tuple(offsets)
        self._starts = torch.tensor(offsets, device=self.device)
        # the shapes, as tensors without storage (what torch's unflatten reads)
        self._templates = [torch.empty(shape, device="meta") for shape in self.shapes]
        self._strides = tuple(t.stride() for t in self._templates)

    def join(self, values: list[Tensor] | Flat) -> Tensor:
        """One flat tensor of ``values`` (one per tensor, each its tensor's shape; a
        :class:`Flat` laid out as these segments is taken as it is)."""
        if isinstance(values, Flat):
            if values.segments is self or values.segments.shapes == self.shapes:
                return values.values
            values = values.split()
        if self.k == 1:
            return values[0].reshape(-1)
        flat, seg = (values.flat, values.seg) if isinstance(values, Laid) else (None, None)
        if flat is not None and seg is not None and (seg is self or seg.shapes == self.shapes) and \
                (flat.requires_grad or not torch.is_grad_enabled()
                 or not any(v.requires_grad for v in values)):
            return flat             # (a detached flat under leaves that need a graph: joined)
        found = None if values[0].grad_fn is not None else _laid_end_to_end(values, self.total)
        return found if found is not None else torch._C._nn.flatten_dense_tensors(values)

    def split(self, flat: Tensor) -> list[Tensor]:
        """The inverse of ``join``: views of ``flat``, one per tensor, in its shape."""
        if flat.dim() == 0:
            flat = flat.expand(self.total)
        if self.k == 1:
            return [flat.view(self.shapes[0])]
        if not flat.requires_grad and flat.is_contiguous():     # half the time of unflatten's views
            at = flat.storage_offset()      # (but as_strided's backward is slow: not in a graph)
            return Laid([flat.as_strided(shape, stride, at + offset)
                         for shape, stride, offset in zip(self.shapes, self._strides, self.offsets)], flat, self)
        return Laid(torch._C._nn.unflatten_dense_tensors(flat, self._templates), flat, self)

    def spread(self, values: list[Tensor]) -> Tensor:
        """One number per tensor (0-dim each) as one per element."""
        if self.k == 1:
            return values[0]
        return torch.cat([v.reshape(1).expand(n) for v, n in zip(values, self.sizes)])

    def sums(self, flat: Tensor) -> list[Tensor]:
        """The adjoint of ``spread``: a per-element cotangent summed over each tensor's
        elements (0-dim each)."""
        if flat.dim() == 0:
            flat = flat.expand(self.total)
        if self.k == 1:
            return [flat.sum()]
        return [x.sum() for x in flat.split(self.sizes)]

    def pick(self, flat: Tensor) -> list[Tensor]:
        """One number per tensor from a per-element result that is constant on each
        tensor (a spread value's image): its value at each tensor's first element."""
        if flat.dim() == 0:
            return [flat] * self.k
        return [flat[s] for s in self.offsets]

    def place(self, values: list[Tensor | None]) -> Tensor | None:
        """The adjoint of ``pick``: each tensor's cotangent at its first element, 0 elsewhere."""
        if all(v is None for v in values):
            return None
        like = next(v for v in values if v is not None)
        stacked = torch.stack([torch.zeros_like(like) if v is None else v for v in values])
        out = torch.zeros(self.total, dtype=stacked.dtype, device=stacked.device)
        return out.index_copy(0, self._starts, stacked)


def _laid_end_to_end(values: list[Tensor], total: int) -> Tensor | None:
    """A flat view over ``values`` if they are contiguous and consecutive in one
    storage (and none needs a graph), else None."""
    first = values[0]
    if torch.is_grad_enabled() and any(v.requires_grad for v in values):
        return None
    size = first.element_size()
    ptr = first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    for v in values:
        if not v.is_contiguous() or v.dtype != first.dtype or v.data_ptr() != ptr \
                or v.untyped_storage().data_ptr() != storage:
            return None
        ptr += v.numel() * size
    if (first.storage_offset() + total) * size > first.untyped_storage().nbytes():
        return None
    return first.as_strided((total,), (1,), first.storage_offset())


class ElementSums(NamedTuple):
    """A hyperparameter's cotangent from one flat call, per element, not yet summed per
    tensor: what :meth:`Call.vjp` returns for the names in ``defer``, so that a caller
    that adds the cotangents of many steps (the sweep) adds them per element and sums
    once (``segments.sums``) instead of once a step."""

    flat: Tensor                # per element, or 0-dim (the same for every element)
    segments: Segments


class Flat(NamedTuple):
    """Per-tensor cotangents left laid end to end, as one flat call computed them: what
    :meth:`Call.vjp` returns for b_j and each tensor-shaped S_j field when its caller asks
    for ``flat`` (the sweep, which passes them to the next step's VJP, where ``join``
    takes them as they are: no views cut a step only to be joined again)."""

    values: Tensor              # per element, contiguous, ``segments.total`` of them
    segments: Segments

    def split(self) -> list[Tensor]:
        """Per-tensor views, each its tensor's shape."""
        return self.segments.split(self.values)


def listed(values: Any) -> Any:
    """A per-tensor list of ``values``: :class:`Flat` ones split, others as they are."""
    return values.split() if isinstance(values, Flat) else values


# --- running a rule over one call's tensors ----------------------------------------------
class _Kind(NamedTuple):
    """How a State field is carried through a flat call."""

    kind: str           # "none", "int", "scalar" (one number per tensor), "full" (tensor-shaped)
    value: Any = None   # the int, for "int"


def field_kind(values: list[Any], params: list[Tensor]) -> _Kind:
    """The kind of one State field over a call's tensors (the same for all: see ``key``)."""
    first = values[0]
    if first is None:
        return _Kind("none")
    if not isinstance(first, Tensor):
        return _Kind("int", first)
    if first.dim() == 0 and params[0].dim() > 0:
        return _Kind("scalar")
    return _Kind("full")


def field_kinds(state: Any, idx: list[int], params: list[Tensor]) -> list[_Kind]:
    own = [params[i] for i in idx]
    return [field_kind([values[i] for i in idx], own) for values in state]


def key(state: Any, i: int, param: Tensor) -> tuple[Any, ...]:
    """What tensors of one call must share: each State field's kind (an int such as the
    step count by value, so that t is one number per call), and the dtype and device."""
    out: list[Any] = [param.dtype, param.device]
    for values in state:
        x = values[i]
        out.append(None if x is None else x if not isinstance(x, Tensor)
                   else ("scalar" if x.dim() == 0 and param.dim() > 0 else "full", x.dtype))
    return tuple(out)


def _reduced(dtype: torch.dtype) -> bool:
    return hyper_dtype(dtype) != dtype


def _wide(x: Any) -> Any:
    """A tensor in the hyperparameters' dtype (float32 at least): the VJP of a
    reduced-precision model's step is taken without bfloat16's rounding or float16's range."""
    return x.to(hyper_dtype(x.dtype)) if isinstance(x, Tensor) and x.is_floating_point() \
        and _reduced(x.dtype) else x


def _stored(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None or x.dtype == dtype or not x.is_floating_point() else x.to(dtype)


# the hyperparameter values made from a param group's number (``record_constant``), by id while
# they live, with that number: a rule that ``skips_zero`` a hyperparameter gets the float
# 0.0 for its zeros, and one that takes it among its ``floats`` gets the number itself.
# (Not a WeakKeyDictionary: it compares tensors with ==, elementwise, and reads the result.)
_CONSTANTS: dict[int, tuple[weakref.ref[Tensor], float]] = {}


def record_constant(value: Tensor, number: float) -> Tensor:
    """``value``, a 0-dim tensor made from a param group's ``number``, recorded as such."""
    key = id(value)
    _CONSTANTS[key] = (weakref.ref(value, lambda _: _CONSTANTS.pop(key, None)), float(number))
    return value


def constant_value(value: Tensor | None) -> float | None:
    """The param group's number ``value`` was made from by :func:`record_constant`, if it has not
    been changed in place since; else None."""
    if value is None:
        return None
    kept = _CONSTANTS.get(id(value))
    return kept[1] if kept is not None and kept[0]() is value and value._version == 0 else None


def _one_number(values: list[Tensor]) -> float | None:
    """The number all ``values`` were made from by :func:`record_constant`, if they share one."""
    numbers = {constant_value(v) for v in values}
    return next(iter(numbers)) if len(numbers) == 1 else None


class _Plan(NamedTuple):
    """How one flat call carries each argument, decided before it runs (hashable: what a
    compiled call specializes on)."""

    # (name, "one" | "spread" | "elements" | "module" | "zero" | "float", the param group's
    # number for "float", else None)
    hypers: tuple[tuple[str, str, float | None], ...]
    per_tensor: tuple[bool, ...]            # per State field: one number per tensor (pick/place)
    dtypes: tuple[torch.dtype | None, ...]  # per State field: the dtype its new value is stored in
    # the VJP may read the state the step produced (Rule.reads_after): stored as computed,
    # in the parameters' dtype, and no reduced-precision widening in between
    after: bool = False


class Call:
    """One rule call: tensors ``idx`` of the optimizer, with equal flags and equal
    :func:`key`, stepped together (flat if the rule is elementwise, else one by one)."""

    def __init__(self, rule: Rule, flags: Any, idx: list[int], params: list[Tensor]):
        self.rule, self.flags, self.idx = rule, flags, idx
        self.everything = idx == list(range(len(params)))     # every tensor, in order
        self.param_dtype = params[idx[0]].dtype
        self.reduced = _reduced(self.param_dtype)
        self.kinds: list[_Kind] = []       # the state's, set before each use (field_kinds)
        self.compile = False               # through torch.compile (set before each use)
        self.segments = Segments([params[i] for i in idx]) if rule.elementwise else None
        self.group = 0                     # the param group of its first tensor
        # per hyperparameter: the per-tensor values last spread and their spread (hypers_in)
        self._spread: dict[str, tuple[list[Tensor], list[int], Tensor]] = {}
        self._kept_plan: tuple[Mapping[str, list[Tensor]], Any, _Plan] | None = None
        # the hypers as the rule took them, for that plan and hp, where none is spread or laid out
        self._kept_hypers: tuple[Mapping[str, list[Tensor]], _Plan, bool, dict[str, Any]] | None = None

    def mine(self, values: list[Any]) -> list[Any]:
        """The call's entries of a per-tensor list (or of a :class:`Flat` one)."""
        if self.everything:
            return values
        values = listed(values)
        return [values[i] for i in self.idx]

    def step(self, params: list[Tensor], state: Any, grads: list[Tensor | None],
             hp: Mapping[str, list[Tensor]]) -> tuple[list[Tensor], list[list[Any]]]:
        """θ' and each State field for the call's tensors, stored as torch.optim stores them:
        θ' in its parameter's dtype, a state entry in the dtype it came in (one this step
        creates, as SGD's first buffer, in its parameter's)."""
        if self.segments is None:
            return self._step_each(params, state, grads, hp)
        return _flat_step(self, self._plan(state, hp), params, state, grads, hp)

    def vjp(self, params: list[Tensor], state: Any, grads: list[Tensor | None],
            hp: Mapping[str, list[Tensor]], cot_params: list[Tensor], cot_state: Any,
            need: frozenset[str], after: Any = None, defer: frozenset[str] = frozenset(),
            flat: bool = False) -> tuple[Any, list[Any], list[Tensor], dict[str, Any]]:
        """b_j, S_j (per field), o_j and a_j (per hyperparameter) for the call's tensors.
        ``after``: the state this step produced, if known (for a rule that ``reads_after``).
        ``defer``: names whose a_j may come back as :class:`ElementSums` (one number per
        tensor, on the flat path) instead of a list. ``flat``: b_j and the tensor-shaped
        S_j fields may come back as :class:`Flat` (on the flat path) instead of lists."""
        if self.segments is None:
            return self._vjp_each(params, state, grads, hp, listed(cot_params),
                                  type(cot_state)(*(listed(x) for x in cot_state)), need)
        return _flat_vjp(self, self._plan(state, hp), params, state, grads, hp, cot_params,
                         cot_state, need, after, defer, flat)

    def _compiling(self) -> bool:
        """Whether this call's rule runs compiled: asked for, and nothing is recorded for
        autograd (the full autograd unroll steps eagerly, through the graph)."""
        return self.compile and not torch.is_grad_enabled()

    def _plan(self, state: Any, hp: Mapping[str, list[Tensor]]) -> _Plan:
        """The call's plan, kept while the hyperparameters are the same dict (every step of
        an unroll without a schedule) and the state's kinds and dtypes are the same."""
        i = self.idx[0]
        key = (tuple(k.kind for k in self.kinds),
               tuple(values[i].dtype if isinstance(values[i], Tensor) else None for values in state))
        kept = self._kept_plan
        if kept is not None and kept[0] is hp and kept[1] == key:
            return kept[2]
        plan = self._make_plan(state, hp)
        self._kept_plan = (hp, key, plan)       # (hp held: its id is not reused while kept)
        return plan

    def _make_plan(self, state: Any, hp: Mapping[str, list[Tensor]]) -> _Plan:
        hypers = []
        for name, values in hp.items():
            mine = self.mine(values)
            first = mine[0]
            number = _one_number(mine) if name in self.rule.skips_zero or name in self.rule.floats else None
            how = ("module" if name not in self.rule.hypers else
                   "zero" if name in self.rule.skips_zero and number == 0.0 else
                   "float" if name in self.rule.floats and number is not None else
                   "one" if first.dim() == 0 and all(v is first for v in mine) else
                   "spread" if all(v.dim() == 0 for v in mine) else "elements")
            hypers.append((name, how, number if how == "float" else None))
        i = self.idx[0]
        per_tensor, dtypes = [], []
        for name, values, kind in zip(type(state)._fields, state, self.kinds):
            # a state entry torch.optim keeps as one number per tensor that came in so, or that
            # the step creates (ASGD's eta), unless a hyperparameter learned per element
            # makes it per element
            created = kind.kind == "none" and name in self.rule.scalar_state.values()
            per_element = any(key == name and hp[h][i].dim() > 0
                              for h, key in self.rule.scalar_state.items() if h in hp)
            per_tensor.append((kind.kind == "scalar" or created) and not per_element)
            x = values[i]
            dtypes.append(x.dtype if isinstance(x, Tensor) and kind.kind == "full" else
                          None if kind.kind == "scalar" else self.param_dtype)
        after = self.rule.reads_after and not self.reduced and \
            all(d == self.param_dtype for d, k in zip(dtypes, self.kinds) if k.kind == "full")
        return _Plan(tuple(hypers), tuple(per_tensor), tuple(dtypes), after)

    # -- the flat path's pieces (read by _flat_step and _flat_vjp) --------------------------
    def state_in(self, state: Any) -> Any:
        seg = self.segments
        assert seg is not None
        fields: list[Any] = []
        for values, kind in zip(state, self.kinds):
            mine = self.mine(values)
            fields.append(None if kind.kind == "none" else kind.value if kind.kind == "int"
                          else seg.spread(mine) if kind.kind == "scalar" else seg.join(mine))
        return type(state)(*fields)

    def hypers_in(self, plan: _Plan, hp: Mapping[str, list[Tensor]]) -> dict[str, Any]:
        """Each hyperparameter as the rule takes it: a tensor, NO_DECAY (its skips_zero) or
        the param group's number (its floats). Kept while the plan and ``hp`` are the same
        objects and none is spread or laid out (then it holds the same tensors)."""
        seg = self.segments
        assert seg is not None
        compiling = self._compiling()
        kept = self._kept_hypers
        if kept is not None and kept[0] is hp and kept[1] is plan and kept[2] == compiling:
            return kept[3]
        out: dict[str, Any] = {}
        for name, how, number in plan.hypers:
            if how == "float":
                if not compiling:
                    out[name] = number
                    continue
                how = "one"     # (compiled: the tensor, not a float the graph would trace as an input)
            mine = self.mine(hp[name])
            out[name] = (NO_DECAY if how == "zero" else mine[0] if how in ("one", "module")
                         else self._spread_of(name, mine)
                         if how == "spread" else seg.join([v.expand(s) for v, s in zip(mine, seg.shapes)]))
        if all(how in ("float", "zero", "one", "module") for _, how, _ in plan.hypers):
            self._kept_hypers = (hp, plan, compiling, out)     # (the same tensors, whatever their values)
        return out

    def _spread_of(self, name: str, values: list[Tensor]) -> Tensor:
        """``segments.spread(values)``, kept from the last call while the same tensors hold the
        same values (their version counters unchanged): the unroll passes one step's
        hyperparameters to every step, and the sweep again."""
        seg = self.segments
        assert seg is not None
        if torch.is_grad_enabled() and any(v.requires_grad for v in values):
            return seg.spread(values)
        kept = self._spread.get(name)
        if kept is not None and len(kept[0]) == len(values) and \
                all(a is b and a._version == n for a, b, n in zip(kept[0], values, kept[1])):
            return kept[2]
        flat = seg.spread(values)
        self._spread[name] = (list(values), [v._version for v in values], flat)
        return flat

    def state_out(self, plan: _Plan, new_state: Any) -> list[list[Any]]:
        seg = self.segments
        assert seg is not None
        out: list[list[Any]] = []
        for x, per_tensor, dtype in zip(new_state, plan.per_tensor, plan.dtypes):
            if x is None:
                out.append([None] * seg.k)
            elif not isinstance(x, Tensor):
                out.append([x] * seg.k)
            elif per_tensor:
                out.append(seg.pick(x))
            else:
                out.append(seg.split(_stored(x, dtype)))
        return out

    def cot_state_in(self, plan: _Plan, cot_state: Any) -> list[Any]:
        seg = self.segments
        assert seg is not None
        out: list[Any] = []
        for values, kind, per_tensor in zip(cot_state, self.kinds, plan.per_tensor):
            if isinstance(values, Flat) and not per_tensor and kind.kind != "int":
                out.append(seg.join(values))
                continue
            mine = self.mine(listed(values))
            if kind.kind == "int" or all(v is None for v in mine):
                out.append(None)
            elif per_tensor:
                out.append(seg.place(mine))
            elif all(v is not None for v in mine):
                out.append(seg.join(mine))
            else:
                out.append(seg.join([torch.zeros(s, dtype=seg.dtype, device=seg.device)
                                     if v is None else v for v, s in zip(mine, seg.shapes)]))
        return out

    def hypers_out(self, plan: _Plan, found: Mapping[str, Tensor], hp: Mapping[str, list[Tensor]],
                   need: frozenset[str], defer: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Each needed hyperparameter's cotangent per tensor, in its own shape there; for a
        name in ``defer`` that is one number per tensor, per element (:class:`ElementSums`)."""
        seg = self.segments
        assert seg is not None
        out: dict[str, Any] = {}
        for name, how, _ in plan.hypers:
            if name not in need:
                continue
            a = found.get(name)
            like = self.mine(hp[name])
            if a is None:
                out[name] = [torch.zeros_like(v) for v in like]
            elif how == "module":                           # a module's weight: the call's total
                out[name] = [a] + [torch.zeros_like(v) for v in like[1:]]
            elif how in ("one", "spread", "float"):
                out[name] = ElementSums(a, seg) if name in defer else seg.sums(a)
            else:
                out[name] = [x.sum() if v.dim() == 0 else x for x, v in zip(seg.split(a), like)]
        return out

    # -- tensor by tensor ---------------------------------------------------------------------
    def _step_each(self, params: list[Tensor], state: Any, grads: list[Tensor | None],
                   hp: Mapping[str, list[Tensor]]) -> tuple[list[Tensor], list[list[Any]]]:
        new_params: list[Tensor] = []
        fields: list[list[Any]] = [[] for _ in state]
        for i in self.idx:
            p, g = params[i], grads[i]
            assert g is not None
            old = type(state)(*(values[i] for values in state))
            new_p, new = self.rule.step(self.flags, p, old, g, {k: v[i] for k, v in hp.items()})
            new_params.append(_stored(new_p, p.dtype))
            for out, x, before in zip(fields, new, old):
                out.append(_stored(x, before.dtype if isinstance(before, Tensor) else
                                   p.dtype if isinstance(x, Tensor) and x.dim() > 0 else None)
                           if isinstance(x, Tensor) else x)
        return new_params, fields

    def _vjp_each(self, params: list[Tensor], state: Any, grads: list[Tensor | None],
                  hp: Mapping[str, list[Tensor]], cot_params: list[Tensor], cot_state: Any,
                  need: frozenset[str]) -> tuple[list[Tensor], list[list[Any]], list[Tensor],
                                                 dict[str, list[Tensor]]]:
        run = self.rule.vjp or autograd_vjp(self.rule)
        b: list[Tensor] = []
        o: list[Tensor] = []
        fields: list[list[Any]] = [[] for _ in state]
        hypers: dict[str, list[Tensor]] = {name: [] for name in need}
        for i in self.idx:
            hp_i = {k: v[i] for k, v in hp.items()}
            out = run(self.flags, _wide(params[i]), type(state)(*(_wide(v[i]) for v in state)),
                      _wide(grads[i]), hp_i, _wide(cot_params[i]),
                      type(cot_state)(*(_wide(v[i]) if isinstance(v[i], Tensor) else None
                                        for v in cot_state)), need)
            b.append(out.params)
            o.append(out.grads)
            for f, x in zip(fields, out.state):
                f.append(x if isinstance(x, Tensor) else None)
            for name in need:
                a = out.hypers.get(name)
                like = hp_i[name]
                hypers[name].append(torch.zeros_like(like) if a is None else
                                    a if a.shape == like.shape else a.sum_to_size(like.shape))
        return b, fields, o, hypers


def _flat_step(call: Call, plan: _Plan, params: list[Tensor], state: Any, grads: list[Tensor | None],
               hp: Mapping[str, list[Tensor]]) -> tuple[list[Tensor], list[list[Any]]]:
    """One flat call's step: join, the rule once (through ``torch.compile`` with
    ``compile=True``: one graph over the flat tensors), split."""
    seg = call.segments
    assert seg is not None
    p = seg.join(call.mine(params))
    g = seg.join(call.mine(grads))
    st = call.state_in(state)
    run, hps = _runner(call, call.rule.step, st, call.hypers_in(plan, hp))
    new_p, new_state = run(call.flags, p, st, g, hps)
    return seg.split(_stored(new_p, call.param_dtype)), call.state_out(plan, new_state)


def _runner(call: Call, body: Any, state: Any, hps: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``body`` (the rule's step or vjp) as the call runs it, with the hypers it gets: eager,
    or through ``torch.compile`` with the rule's per-step numbers (``Rule.scalars``) added.
    Those are formed in double precision from the very hyperparameters the compiled body
    reads (a float32 β where the model is float32), and rounded once: as the kernel itself
    formed them before they were handed in. So 1 − β₂^t agrees with the 1 − β₂ the body
    forms from the same β₂, and their rounding errors cancel in Adam's v/c₂ as eager's do
    (formed in float32, or from the exact β₂ against a float32 1 − β₂, the two disagree by
    about 10⁻⁵ and a float32 CNN's hypergradient moved by 0.1)."""
    if not call._compiling():
        return body, hps
    extra = call.rule.scalars
    if extra is None:
        return compiled(body, call.rule), hps
    wide = {name: _double(value) for name, value in hps.items()}
    dtype = hyper_dtype(call.param_dtype)
    return compiled(body, call.rule), {**hps, **{name: value.to(dtype) if isinstance(value, Tensor) else value
                                               for name, value in extra(state, wide).items()}}


def _double(x: Any) -> Any:
    """One number as a float64 tensor (where its device has float64; else as it is)."""
    if isinstance(x, Tensor) and x.dim() == 0 and x.is_floating_point() and x.device.type != "mps":
        return x.double()
    return x


def _flat_vjp(call: Call, plan: _Plan, params: list[Tensor], state: Any, grads: list[Tensor | None],
              hp: Mapping[str, list[Tensor]], cot_params: list[Tensor], cot_state: Any,
              need: frozenset[str], after: Any = None, defer: frozenset[str] = frozenset(),
              flat: bool = False) -> tuple[Any, list[Any], list[Tensor], dict[str, Any]]:
    """One flat call's VJP, as :func:`_flat_step`; with ``flat``, b_j and the tensor-shaped
    S_j fields left flat (:class:`Flat`). G is joined only where the rule's VJP reads it
    for ``need`` (``Rule.reads_grad``); else the rule gets ``g=None``."""
    seg = call.segments
    assert seg is not None
    p = seg.join(call.mine(params))
    reads = call.rule.reads_grad
    g = seg.join(call.mine(grads)) if reads is None or reads(call.flags, need) else None
    st = call.state_in(state)
    P = seg.join(call.mine(cot_params))
    S = type(state)(*call.cot_state_in(plan, cot_state))
    if call.reduced:                # a reduced-precision model's VJP, in float32 (_wide)
        p, g, P = _wide(p), _wide(g), _wide(P)
        st = type(state)(*(_wide(x) for x in st))
        S = type(state)(*(_wide(x) for x in S))
    hps = call.hypers_in(plan, hp)
    if call.rule.vjp is not None:
        run, hps = _runner(call, call.rule.vjp, st, hps)
    else:
        run = autograd_vjp(call.rule)                       # (stays eager)
    if plan.after and after is not None:
        new = type(state)(*(seg.join(call.mine(values)) if kind.kind == "full" else None
                            for values, kind in zip(after, call.kinds)))
        out = cast(Any, run)(call.flags, p, st, g, hps, P, S, need, after=new)
    else:
        out = run(call.flags, p, st, g, hps, P, S, need)
    fields: list[list[Any]] = []
    for x, kind in zip(out.state, call.kinds):
        if x is None or kind.kind in ("none", "int"):
            fields.append([None] * seg.k)
        elif kind.kind == "scalar":
            fields.append(seg.sums(x))
        else:
            fields.append(_cut(seg, x, flat))
    return _cut(seg, out.params, flat), fields, seg.split(out.grads), \
        call.hypers_out(plan, out.hypers, hp, need, defer)


def _cut(seg: Segments, x: Tensor, flat: bool) -> Any:
    """A flat result per tensor: left as it is (:class:`Flat`) if asked and it is one value
    per element, laid out as ``seg`` lays them; else split."""
    if flat and x.dim() == 1 and x.shape[0] == seg.total and x.is_contiguous():
        return Flat(x, seg)
    return seg.split(x)


_COMPILED: dict[Any, Any] = {}


def compiled(body: Any, rule: Rule) -> Any:
    """``body`` through ``torch.compile``, one copy per rule (each copy has its own
    compiled-code cache, so rules do not evict each other's graphs). Shapes and the
    step count become symbolic after their first change (``dynamic=None``), so a call
    compiles one or two graphs, not one per step."""
    key = (body, id(rule))
    if key not in _COMPILED:
        copy = body if not isinstance(body, types.FunctionType) else \
            types.FunctionType(body.__code__.replace(), body.__globals__, body.__name__,
                               body.__defaults__, body.__closure__)
        _COMPILED[key] = (rule, torch.compile(copy, dynamic=None))     # (the rule kept alive)
    return _COMPILED[key][1]


def autograd_vjp(rule: Rule) -> VjpFn:
    """The four cotangents of one ``rule.step`` by autograd on that single step, for
    rules without a closed-form VJP (user-defined and learned optimizers): it stays
    local to step j, inside the hand-written sweep. A hyperparameter or state entry
    that broadcasts (one number for the tensor) gets its cotangent per element, as a
    closed-form VJP returns it (the caller sums it)."""

    def vjp(flags: Any, p: Tensor, state: Any, g: Tensor, hp: dict[str, Tensor], P: Tensor,
            S: Any, need: frozenset[str]) -> VJP:
        def leaf(x: Tensor, spread: bool) -> Tensor:
            x = x.detach()
            return (x.expand(p.shape) if spread and x.dim() < p.dim() else x).requires_grad_()

        with torch.enable_grad():
            p, g = leaf(p, False), leaf(g, False)
            slots = [f for f, x in enumerate(state) if isinstance(x, Tensor) and x.is_floating_point()]
            fields = list(state)
            for f in slots:
                fields[f] = leaf(fields[f], True)
            state = type(state)(*fields)
            hp = {k: leaf(v, k in rule.hypers) if k in need else v for k, v in hp.items()}
            new_p, new_state = rule.step(flags, p, state, g, hp)
            outs = [(new_p, P)] + [(x, s) for x, s in zip(new_state, S)
                                   if isinstance(x, Tensor) and isinstance(s, Tensor)]
            outs = [(x, c) for x, c in outs if x.requires_grad]
            names = sorted(need)
            inputs = [p] + [fields[f] for f in slots] + [g] + [hp[n] for n in names]
            raw: tuple[Tensor | None, ...] = (None,) * len(inputs)
            if outs:            # (differentiable in the cotangents where they need it: forward mode)
                raw = torch.autograd.grad([x for x, _ in outs], inputs,
                                          [c.expand_as(x) for x, c in outs], allow_unused=True,
                                          create_graph=any(c.requires_grad for _, c in outs))
        found = [torch.zeros_like(x) if r is None else r for r, x in zip(raw, inputs)]
        s_bar: list[Any] = [None] * len(state)
        for f, r in zip(slots, found[1:1 + len(slots)]):
            s_bar[f] = r
        return VJP(found[0], type(state)(*s_bar), found[1 + len(slots)],
                   dict(zip(names, found[2 + len(slots):])))

    return vjp
