"""Differentiable counterparts of ``torch.optim`` optimizers.

One file per optimizer (``sgd.py``, ``adam.py``, ...), each a ``Rule`` (``_rule.py``):
a step and its VJP written for one tensor, and the facts gimli asks about. This module
binds a user's ``torch.optim`` instance to its rule, reading its param groups and its
current state, and runs the rule over the tensors in as few calls as the flags allow
(README.md of this folder)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import learned
from ._core import VJP, Hypers, Interval, hyper_dtype
from ._joint import Joint, joint, joint_state_type, parts
from ._rule import Call, Laid, Rule, _Kind, field_kinds, listed, record_constant
from ._rule import key as call_key
from .custom import CustomRule, InitFn, StepFn, VjpFn
from .learned import LearnedOptimizer

__all__ = ["CustomRule", "InnerOptimizer", "Interval", "LearnedOptimizer", "SUPPORTED", "bind", "register",
           "register_optimizer"]

# torch.optim class name → the file here that differentiates it (AdamW is adam.py's flag)
BUILTIN = {
    "SGD": "sgd", "Adam": "adam", "AdamW": "adam", "Adagrad": "adagrad", "RMSprop": "rmsprop",
    "Adadelta": "adadelta", "Adamax": "adamax", "NAdam": "nadam", "RAdam": "radam",
    "Rprop": "rprop", "ASGD": "asgd", "Adafactor": "adafactor", "Muon": "muon",
}
REFUSED = {
    "LBFGS": "its step() evaluates a closure several times and runs a line search, so one "
             "update is not a function of one gradient G_j, which Algorithm 1 needs",
    "SparseAdam": "it updates from sparse gradients only, while the unroll's G_j are dense "
                  "autograd gradients (use Adam, whose update it approximates)",
}


def _builtin_rules() -> dict[type[torch.optim.Optimizer], Rule]:
    rules: dict[type[torch.optim.Optimizer], Rule] = {}
    for cls_name, file in BUILTIN.items():
        cls = getattr(torch.optim, cls_name, None)
        if cls is not None and importlib.util.find_spec(f"{__name__}.{file}") is not None:
            module = importlib.import_module(f"{__name__}.{file}")
            rules[cls] = module.RULE
    return rules


# optimizer class → its rule (gimli/optim/_rule.py)
SUPPORTED: dict[type[torch.optim.Optimizer], Rule] = _builtin_rules()
SUPPORTED[LearnedOptimizer] = learned.RULE


def register(cls: type[torch.optim.Optimizer], rule: Any) -> None:
    """Make ``cls`` (exact class) differentiable through ``rule`` (a :class:`gimli.optim.Rule`)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"register a torch.optim.Optimizer subclass, not {cls!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"register a gimli.optim.Rule for {cls.__name__}, not {type(rule).__name__} "
                        f"(gimli.register_optimizer builds one from your per-tensor functions)")
    SUPPORTED[cls] = rule


def register_optimizer(cls: type[torch.optim.Optimizer], *, hypers: Sequence[str], init: InitFn,
                       step: StepFn, vjp: VjpFn | None = None,
                       group_keys: Mapping[str, tuple[str, int]] | None = None,
                       ranges: Mapping[str, Interval | tuple[float, float]] | None = None) -> CustomRule:
    """Make a user-defined ``torch.optim.Optimizer`` subclass differentiable.

    Args:
        cls: the user's optimizer class; its param groups hold ``hypers`` and its
            ``state[p]`` the keys that ``init`` returns.
        hypers: the differentiable hyperparameters (param-group keys).
        init: ``init(param, group) -> dict`` of state tensors before the first step.
        step: ``step(param, state, grad, hp) -> (param, state)``, pure, one tensor.
        vjp: optional closed form ``vjp(param, state, grad, hp, cot_param, cot_state)
            -> (param_bar, state_bar, grad_bar, hp_bar)``; without it, autograd on
            the single step gives the cotangents. ``hp_bar[name]`` may be per element
            (the parameter's shape): gimli sums it to the hyperparameter's granularity.
        group_keys: for a hyperparameter kept in a param-group tuple, ``name ->
            (key, index)`` (as Adam's ``"beta1" -> ("betas", 0)``).
        ranges: the values your optimizer accepts, ``name -> (lo, hi)`` (closed) or an
            ``Interval`` (open ends too, e.g. ``Interval(0, 1, hi_open=True)`` for a β);
            a meta-learned value is kept inside (projected, or by ``transform=``), and
            nothing outside is written into your param groups. Unnamed: any real value.

    Registering the same class again replaces its rule for the ``MetaParams`` and
    solvers built afterwards; those built before keep the rule they were built with.
    """
    table = {name: value if isinstance(value, Interval) else Interval(float(value[0]), float(value[1]))
             for name, value in (ranges or {}).items()}
    unknown = sorted(set(table) - set(hypers))
    if unknown:
        raise ValueError(f"ranges= names {', '.join(unknown)}, which are not among hypers= "
                         f"({', '.join(hypers)})")
    rule = CustomRule(hypers, init, step, vjp, group_keys, table)
    register(cls, rule)
    return rule


# Group entries that only select an implementation: accepted and ignored.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


@dataclass
class InnerOptimizer:
    """A ``torch.optim`` instance seen as a pure, differentiable step.

    ``params`` lists the optimizer's tensors in param-group order; group ``g``
    owns ``params[groups[g]]``, with static ``flags[g]`` and numeric
    hyperparameters (names as in its rule's ``hypers``). ``step`` and ``vjp`` run the
    rule over the tensors in as few :class:`~gimli.optim._rule.Call` s as the flags and
    the state allow, each kept between calls in ``_call_cache``.

    Several optimizers (a :class:`~gimli.optim._joint.Joint`) are one
    ``InnerOptimizer`` whose groups have different rules (``group_rules``): the state
    is then one ``State`` whose fields are those of every rule (``None`` for a tensor
    whose rule has no such field), and a hyperparameter is ``None`` for a tensor whose
    rule has no such hyperparameter.
    """

    torch_optimizer: Any            # a torch.optim.Optimizer, or a Joint of several
    rule: Rule                      # the first group's (every group's, but with several)
    params: list[Tensor]
    groups: list[slice]
    flags: list[Any]
    compile: bool = False       # the rule's step and VJP through torch.compile (GimliSolver)
    group_rules: list[Rule] = dataclass_field(default_factory=list)    # per group; [] = rule
    _call_cache: dict[Any, Call] = dataclass_field(default_factory=dict, repr=False, compare=False)
    # the calls of a state laid out step after step, by which gradients are None (_calls)
    _uniform_calls: dict[Any, list[tuple[Call, list[_Kind]]]] = dataclass_field(
        default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.group_rules:
            self.group_rules = [self.rule] * len(self.groups)
        # several rules: the state is the union of their State fields (read_state)
        self.mixed = any(r is not self.rule for r in self.group_rules)
        self._state_types: dict[int, type] = {}     # each group's rule's own State (_own_state)
        self._parts: list[InnerOptimizer] | None = None

    def parts(self) -> list[InnerOptimizer]:
        """Each optimizer's own InnerOptimizer, over its own tensors (with one optimizer:
        this one)."""
        if not isinstance(self.torch_optimizer, Joint):
            return [self]
        if self._parts is None:
            self._parts = [bind(part) for part in self.torch_optimizer.optimizers]
        return self._parts

    @property
    def name(self) -> str:
        return " + ".join(type(o).__name__ for o in parts(self.torch_optimizer))

    def __deepcopy__(self, memo: dict[int, Any]) -> InnerOptimizer:
        """A copy over copied tensors and optimizer, sharing the rules (immutable)."""
        return InnerOptimizer(copy.deepcopy(self.torch_optimizer, memo), self.rule,
                              copy.deepcopy(self.params, memo), list(self.groups),
                              copy.deepcopy(self.flags, memo), self.compile, list(self.group_rules))

    def groups_with(self, name: str) -> list[int]:
        """The param groups whose rule has hyperparameter ``name`` (every group, with one
        optimizer, where it is one of its hyperparameters)."""
        if not self.mixed:                          # (one rule: every group has its names)
            return list(range(len(self.groups)))
        return [g for g, hypers in enumerate(self.group_hypers()) if name in hypers]

    def rules_for(self, name: str) -> list[Rule]:
        """The distinct rules of the groups that have hyperparameter ``name``."""
        out: list[Rule] = []
        for g in self.groups_with(name):
            if all(r is not self.group_rules[g] for r in out):
                out.append(self.group_rules[g])
        return out

    @property
    def hyper_names(self) -> tuple[str, ...]:
        """Every differentiable hyperparameter; a module-valued one (a learned
        optimizer's network) contributes one name per parameter, ``net.<name>``.
        With several optimizers, those of any of them."""
        return tuple(dict.fromkeys(name for hypers in self.group_hypers() for name in hypers))

    def module_hypers(self) -> dict[str, nn.Module]:
        """The module-valued hyperparameters, shared by every param group."""
        values = [rule.read_group(g)[1]
                  for rule, g in zip(self.group_rules, self.torch_optimizer.param_groups)]
        modules = {k: v for vs in values for k, v in vs.items() if isinstance(v, nn.Module)}
        for k, module in modules.items():
            if any(v.get(k, module) is not module for v in values):   # (another optimizer's: none)
                raise ValueError(f"{self.name}: every param group must share the same {k!r} module")
        return modules

    def group_hypers(self) -> list[dict[str, float | Tensor]]:
        """The current hyperparameters of each param group: numbers, or the parameters
        of a module-valued hyperparameter."""
        out = []
        for rule, group in zip(self.group_rules, self.torch_optimizer.param_groups):
            flat: dict[str, float | Tensor] = {}
            for k, v in rule.read_group(group)[1].items():
                if isinstance(v, nn.Module):
                    flat.update({f"{k}.{n}": p for n, p in v.named_parameters()})
                else:
                    flat[k] = v
            out.append(flat)
        return out

    def group_of(self) -> list[int]:
        """The index of the param group each tensor belongs to."""
        return [g for g, sl in enumerate(self.groups) for _ in range(sl.start, sl.stop)]

    def constant_hypers(self, per_group: Mapping[str, Sequence[float]] | None = None) -> Hypers:
        """Every hyperparameter as one 0-dim tensor per parameter, from param_groups (or,
        for a name in ``per_group``, from its value for each group), one tensor per
        distinct value: a call passes a value all its tensors share as it is. (With
        several optimizers, ``None`` for a tensor whose optimizer has no such name.)"""
        values = self.group_hypers()
        for name, given in (per_group or {}).items():
            for g, value in enumerate(given):
                values[g][name] = value
        made: dict[Any, Tensor] = {}

        def constant(value: float | Tensor | None, like: Tensor) -> Tensor | None:
            if value is None:
                return None
            if isinstance(value, Tensor):
                return value.detach()
            key = (repr(value), hyper_dtype(like.dtype), like.device)
            if key not in made:
                # (recorded: a rule may skip its terms at 0, Rule.skips_zero, or take the
                # number as it is, Rule.floats)
                made[key] = record_constant(_as_tensor(value, like), value)
            return made[key]

        return {name: cast(list[Tensor], [constant(values[g].get(name), p)     # (None: Hypers)
                                          for p, g in zip(self.params, self.group_of())])
                for name in self.hyper_names}

    def read_state(self) -> Any:
        """A copy of the optimizer's current state, as the optimizer file's ``State`` (with
        several rules, one State with every rule's fields: ``joint_state_type``)."""
        groups = self.torch_optimizer.param_groups
        torch_state = self.torch_optimizer.state
        per_param = [self.group_rules[g].read_state(torch_state.get(p, {}), p, groups[g])
                     for p, g in zip(self.params, self.group_of())]
        if not self.mixed:
            return type(per_param[0])(*(list(field) for field in zip(*per_param)))
        union = joint_state_type([type(x) for x in per_param])
        return union(*([getattr(x, f, None) for x in per_param] for f in _fields(union)))

    def _own_state(self, state: Any, group: int) -> Any:
        """Group ``group``'s rule's State, of the union ``state``'s fields by name."""
        own = self._state_types.get(group)
        if own is None:                 # (its State type: that of an empty torch.optim state)
            group_dict = self.torch_optimizer.param_groups[group]
            p = self.params[self.groups[group].start]
            own = self._state_types[group] = type(self.group_rules[group].read_state({}, p, group_dict))
        return own(*(getattr(state, f) for f in _fields(own)))

    def write_state(self, state: Any, i: int) -> dict[str, Any]:
        """Tensor i's entry of ``torch_optimizer.state`` for ``state`` (the inverse of
        :meth:`read_state`)."""
        g = self.group_of()[i]
        if self.mixed:
            state = self._own_state(state, g)
        return self.group_rules[g].state_entry(type(state)(*(values[i] for values in state)))

    def check_commit(self, granularity: dict[str, str]) -> None:
        """Raise if a commit under these meta-learned granularities would leave an
        optimizer state that ``torch.optim`` cannot step: a state entry that
        ``torch.optim`` keeps as one number per tensor (the rule's ``SCALAR_STATE``:
        NAdam's ``mu_product``, ASGD's ``eta``) but that a hyperparameter learned per
        element makes one per element."""
        for name, per in granularity.items():
            scalar_state = {k: v for rule in self.rules_for(name) for k, v in rule.scalar_state.items()}
            if per == "element" and name in scalar_state:
                key = scalar_state[name]
                raise ValueError(
                    f"commit=True cannot hand {self.name} its state back: {name} is learned per "
                    f"element, so the unroll's {key!r} is one value per element, while "
                    f"torch.optim.{self.name} keeps {key!r} as one number per tensor and its "
                    f"step() fails on anything else. Learn {name} per 'tensor', 'group' or "
                    f"'scalar' to commit, or call without commit=True (the unroll then leaves "
                    f"the model and optimizer as they were)")

    def step(self, params: list[Tensor], state: Any, grads: list[Tensor | None],
             hp: Hypers) -> tuple[list[Tensor], Any]:
        """One update of every tensor; a tensor whose gradient is ``None`` is left
        alone with its state, as ``torch.optim`` does."""
        calls = self._calls(params, grads, state)
        if len(calls) == 1 and len(calls[0].idx) == len(params) and not self.mixed:
            out_params, out_state = calls[0].step(params, state, grads, hp)   # one call, every tensor
            return out_params, type(state)(*out_state)
        new_params = list(params)
        new_state = [list(field) for field in state]
        for call in calls:
            own, at, hp_own, _ = self._for_call(call, state, hp)
            out_params, out_state = call.step(params, own, grads, hp_own)
            for k, i in enumerate(call.idx):
                new_params[i] = out_params[k]
                for f, values in zip(at, out_state):
                    new_state[f][i] = values[k]
        return new_params, type(state)(*new_state)

    def _for_call(self, call: Call, state: Any, hp: Hypers,
                  need: frozenset[str] = frozenset()) -> tuple[Any, list[int], Hypers, frozenset[str]]:
        """What one call reads: the state as its rule's own State and where each of its
        fields sits in ``state``, the hyperparameters its rule has, and those of ``need``."""
        if not self.mixed:
            return state, list(range(len(state))), hp, need
        own = self._own_state(state, call.group)
        at = [_fields(type(state)).index(f) for f in _fields(type(own))]
        hp_own = {k: v for k, v in hp.items() if v[call.idx[0]] is not None}
        return own, at, hp_own, need & frozenset(hp_own)

    def vjp(self, params: list[Tensor], state: Any, grads: list[Tensor | None], hp: Hypers,
            cot_params: list[Tensor], cot_state: Any, need: frozenset[str], after: Any = None,
            defer: frozenset[str] = frozenset(), flat: bool = False) -> VJP:
        """The four cotangents of :meth:`step`. A tensor that did not step passes
        its cotangents through unchanged and gets no o_j (``None``) and no a_j. Each b_j
        is a new tensor or one of ``cot_params`` (never θ, G or the state), so the
        caller may add to it in place. ``after``: the state :meth:`step` produced from these
        arguments, if the caller holds it (the sweep does: σ_{j+1}); a rule that
        ``reads_after`` then reads its new moments instead of recomputing them.
        ``defer``: hyperparameters whose a_j may come back per element, not yet summed per
        tensor (``_rule.ElementSums``), where one rule call steps every tensor. ``flat``:
        b_j and the tensor-shaped S_j fields may come back laid end to end (``_rule.Flat``)
        there too, and ``cot_params`` and ``cot_state``'s fields may come in so."""
        calls = self._calls(params, grads, state)
        if len(calls) == 1 and len(calls[0].idx) == len(params) and not self.mixed:
            b_k, s_k, o_k, a_k = calls[0].vjp(params, state, grads, hp, cot_params, cot_state, need,
                                              after, defer, flat)
            return VJP(b_k, type(cot_state)(*s_k), o_k, a_k)    # one call, every tensor
        cot_params = listed(cot_params)
        cot_state = type(cot_state)(*(listed(field) for field in cot_state))
        b = list(cot_params)
        s = [list(field) for field in cot_state]
        o: list[Tensor | None] = [None] * len(params)
        a: dict[str, list[Tensor | None]] = {name: [None] * len(params) for name in need}
        for call in calls:
            own, at, hp_own, need_own = self._for_call(call, state, hp, need)
            cot_own = type(own)(*(cot_state[f] for f in at))
            after_own = None if after is None else type(own)(*(after[f] for f in at))
            b_k, s_k, o_k, a_k = call.vjp(params, own, grads, hp_own, cot_params, cot_own, need_own,
                                          after_own)
            for k, i in enumerate(call.idx):
                b[i], o[i] = b_k[k], o_k[k]
                for f, values in zip(at, s_k):
                    s[f][i] = values[k]
                for name in need_own:
                    a[name][i] = a_k[name][k]
        return VJP(b, type(cot_state)(*s), o, a)

    def _calls(self, params: list[Tensor], grads: list[Tensor | None], state: Any) -> list[Call]:
        """The tensors that step (gradient not ``None``) in as few rule calls as the
        flags allow: param groups with equal flags step together (their hyperparameters
        are per tensor anyway), split where the state's kinds differ (SGD: a tensor with
        no momentum buffer yet; a tensor whose step count differs from the rest's).

        From the unroll's second step on, every state field is laid out (one flat tensor,
        ``Laid``) or one value for all tensors (the step count): the calls then depend only
        on which gradients are ``None``, and are kept for that (:func:`_uniform`)."""
        uniform = None if self.mixed else _uniform(state)
        if uniform is not None:
            key = (tuple(g is None for g in grads), uniform)
            kept = self._uniform_calls.get(key)
            if kept is not None:
                for same, kinds in kept:
                    same.kinds = [_Kind("int", values[same.idx[0]]) if kind.kind == "int" else kind
                                  for kind, values in zip(kinds, state)]
                    same.compile = self.compile
                return [same for same, _ in kept]
        calls: dict[Any, list[int]] = {}
        for g, sl in enumerate(self.groups):
            flags = (id(self.group_rules[g]), _hashable(self.flags[g], g))
            for i in range(sl.start, sl.stop):
                if grads[i] is not None:
                    calls.setdefault((flags, call_key(state, i, params[i])), []).append(i)
        out = []
        for (flags, _), idx in calls.items():
            k = (flags, tuple(idx))
            call = self._call_cache.get(k)
            if call is None:
                group = next(g for g, sl in enumerate(self.groups) if sl.start <= idx[0] < sl.stop)
                call = self._call_cache[k] = Call(self.group_rules[group], self.flags[group], idx, params)
                call.group = group
            call.rule = self.group_rules[call.group] if self.mixed else self.rule
            call.kinds = field_kinds(self._own_state(state, call.group) if self.mixed else state,
                                     idx, params)
            call.compile = self.compile
            out.append(call)
        if uniform is not None:
            self._uniform_calls[key] = [(call, list(call.kinds)) for call in out]
        return out


def _uniform(state: Any) -> tuple[Any, ...] | None:
    """Each state field as one description for every tensor, or None where the fields
    differ from tensor to tensor: a laid-out field (``Laid``: every entry its tensor's
    shape, one dtype), or one Python value (the step count, or None) in every entry."""
    out: list[Any] = []
    for values in state:
        if isinstance(values, Laid) and values.flat is not None:
            out.append(values.flat.dtype)
            continue
        first = values[0] if values else None
        if isinstance(first, Tensor) or any(v is not first and not (type(v) is int and v == first)
                                            for v in values):
            return None
        out.append("int" if isinstance(first, int) else None)
    return tuple(out)


def _fields(state_type: type) -> tuple[str, ...]:
    return cast(tuple[str, ...], getattr(state_type, "_fields"))


def _hashable(flags: Any, group: int) -> Any:
    """The flags as a key (equal flags step together), or the group's own index."""
    try:
        hash(flags)
    except TypeError:
        return ("group", group)
    return flags


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    return torch.tensor(value, dtype=hyper_dtype(like.dtype), device=like.device)   # ≥ float32


def _rule_of(optimizer: torch.optim.Optimizer) -> Rule:
    rule = SUPPORTED.get(type(optimizer))
    name = type(optimizer).__name__
    if rule is None and name in REFUSED and type(optimizer) is getattr(torch.optim, name, None):
        raise TypeError(f"gimli cannot differentiate through {name}: {REFUSED[name]}")
    if rule is None:
        names = ", ".join(sorted({cls.__name__ for cls in SUPPORTED}))
        raise TypeError(f"gimli cannot differentiate through {name}: the supported optimizers "
                        f"are {names} (exact classes, not subclasses); register your own with "
                        f"gimli.register_optimizer")
    return rule


def bind(optimizer: Any) -> InnerOptimizer:
    """Read a ``torch.optim`` instance (or a list of them, each over its own tensors):
    its class, param groups and flags."""
    optimizer = joint(optimizer)
    params: list[Tensor] = []
    groups: list[slice] = []
    flags = []
    rules = []
    owner: dict[int, int] = {}
    for k, part in enumerate(parts(optimizer)):
        rule = _rule_of(part)
        for group in part.param_groups:
            groups.append(slice(len(params), len(params) + len(group["params"])))
            params.extend(group["params"])
            flags.append(rule.read_group(group)[0])
            rules.append(rule)
            for p in group["params"]:
                if p.is_complex() or p.is_sparse:
                    raise TypeError(f"gimli supports dense real parameters only; {type(part).__name__} "
                                    f"holds a {'complex' if p.is_complex() else 'sparse'} tensor")
                if id(p) in owner:
                    where = ("the optimizer's param_groups" if owner[id(p)] == k else
                             f"the param_groups of optimizers #{owner[id(p)]} and #{k} of the list "
                             f"(each tensor must be stepped by one optimizer)")
                    raise ValueError(f"a tensor of shape {tuple(p.shape)} appears twice in {where}")
                owner[id(p)] = k
    return InnerOptimizer(optimizer, rules[0], params, groups, flags, group_rules=rules)


GRANULARITY_LETTERS = {"scalar": "S", "group": "G", "tensor": "T", "element": "E"}


def capabilities() -> dict[str, dict[str, tuple[str, ...]]]:
    """Each built-in optimizer's learnable hyperparameters and their granularities."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for cls, rule in SUPPORTED.items():
        if rule is learned.RULE or cls.__name__ in out or not (cls.__name__ in BUILTIN):
            continue
        out[cls.__name__] = {name: rule.granularities_of(name) for name in rule.hypers
                             if name not in rule.no_hypergradient}
    out["LearnedOptimizer"] = {"net": ("scalar",), "lr": tuple(GRANULARITY_LETTERS),
                               "beta": tuple(GRANULARITY_LETTERS)}
    return out


def capability_table() -> str:
    """The guide's table of what can be meta-learned (docs/guide/what-can-be-learned.md), generated from the rules."""
    lines = ["| optimizer | learnable hyperparameters and granularities |", "|---|---|"]
    for name, hypers in capabilities().items():
        cells = [f"`{h}` {''.join(GRANULARITY_LETTERS[g] for g in per)}" for h, per in hypers.items()]
        lines.append(f"| `{name}` | {' · '.join(cells)} |")
    return "\n".join(lines)
