"""The inner problem: the user's model, losses, optimizer and meta-parameters, bound.

It turns a list θ (one tensor per optimizer parameter) into a model view and
evaluates the training and validation losses there; the unroll, the sweep and
the oracle all go through it, so they evaluate the very same functions.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from ._functional import FunctionalModel, Slots
from ._meta import MetaParams
from ._schedule import Schedule, Schedulers, attach, base_lrs, build_schedule, schedulers
from .optim import InnerOptimizer, bind
from .optim._joint import joint, parts
from .optim._core import hyper_dtype

LossFn = Callable[[FunctionalModel, Any, MetaParams], Tensor]
ValLossFn = Callable[..., Tensor]        # (model, batch) or (model, batch, meta)


class GimliWarning(UserWarning):
    """A setup under which some hypergradient is not what it seems: identically zero (one
    of the paper's Requirements I–III of §2.4 is not met), or taken through an operation
    whose second derivative this torch gets wrong."""


class GimliInfo(UserWarning):
    """A choice gimli made for the user (``mode="auto"``), said once per solver and choice."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient, hypergradient or meta-parameter: what
    ``step(on_nonfinite="skip")`` skips."""


class Split(NamedTuple):
    phi_opt: dict[str, list[Tensor]]   # every hyperparameter, one value per tensor
    learned: frozenset[str]            # the hyperparameters that are meta-parameters
    phi_loss: list[Tensor]             # φ^loss as leaves
    schedule: Schedule | None          # per-step hyperparameters of an LR scheduler
    # per step j, the values of the hyperparameters learned per step (empty: none is)
    stepwise: list[dict[str, list[Tensor]]] = []

    def per_step(self, steps: int) -> list[dict[str, list[Tensor]]]:
        """Each unroll step's hyperparameters: φ^opt, with step j's values of those learned
        per step, or the scheduler's values at step j (a value learned per step is that
        step's base value, which the scheduler scales as it scales the base lr)."""
        out = []
        for j in range(steps):
            hp = {**self.phi_opt, **self.stepwise[j]} if self.stepwise else self.phi_opt
            out.append(hp if self.schedule is None else self.schedule.at(j, hp))
        return out


@dataclass
class Problem:
    module: nn.Module
    loss_fn: LossFn
    val_loss_fn: ValLossFn | None
    meta: MetaParams
    inner: InnerOptimizer
    names: list[str]         # model name of each optimizer tensor, in optimizer order
    frozen: list[str]        # model parameters the optimizer does not hold
    scheduler: Any = None    # a torch.optim.lr_scheduler replayed inside the unroll
    slots: Slots | None = None          # where the module keeps its tensors
    shadows: Any = None                 # with lr meta-learned: the schedule's derivative (_schedule)
    # the module's (name, parameter) pairs while one hypergradient is computed (held())
    _held: list[tuple[str, Tensor]] | None = None
    val_mode: str | None = None         # L^val with the module in "eval" or "train" mode, or as it is
    clip: Any = None                    # gradient clipping applied to G_j (gimli/_clip.py)
    proximal: float = 0.0               # iMAML's λ: ℓ + λ/2·‖θ − θ₀‖² (mode="implicit", init=)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The module's parameters read once for the computation inside, not at every
        step's view (the module cannot change while gimli evaluates its losses)."""
        self._held = list(self.module.named_parameters())
        try:
            yield
        finally:
            self._held = None

    @classmethod
    def build(cls, model: nn.Module, loss_fn: LossFn, optimizer: Any,
              meta: MetaParams, val_loss_fn: ValLossFn | None, scheduler: Any = None,
              shadows: Any = None) -> Problem:
        """``shadows``: the schedule's shadows to follow, where they are known already (a
        copy of a solver's, for gimli.check); else started here."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
        if not isinstance(meta, MetaParams):
            raise TypeError(f"meta_params must be a gimli.MetaParams, not {type(meta).__name__}")
        optimizer = joint(optimizer)
        if meta.inner is not None and not _same(parts(meta.inner.torch_optimizer), parts(optimizer)):
            given = " + ".join(type(o).__name__ for o in parts(optimizer))
            raise ValueError(f"meta_params was declared for a different optimizer "
                             f"({meta.inner.name}) than the solver's opt ({given} "
                             f"object): build MetaParams(opt, ...) with the opt you pass the solver "
                             f"(with several optimizers, the same list in the same order)")
        if meta.init is not None and meta.init is not model:
            raise ValueError("meta_params' init= is a different module than the solver's model")
        inner = meta.inner if meta.inner is not None else bind(optimizer)
        name_of = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(inner.params) if id(p) not in name_of]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} tensor(s) that are not parameters "
                             f"of the model (first: param #{missing[0]} in its param_groups)")
        names = [name_of[id(p)] for p in inner.params]
        frozen = [n for n, _ in model.named_parameters() if n not in set(names)]
        _check_dtypes(inner, meta)
        _check_weight_norm(model)
        blind = inner.rule.insensitive_to_g if all(r.insensitive_to_g for r in inner.group_rules) else ""
        if blind and any(True for _ in meta.loss.parameters()):
            warnings.warn(f"{inner.name} {blind}: φ^loss (loss=) changes θ'_J through no step, so its "
                          f"hypergradient is at most L^val's direct term (Requirement II of the "
                          f"paper: the update must be differentiable in G)", GimliWarning, stacklevel=3)
        scheduler = schedulers(scheduler, parts(optimizer))
        driven = [None] * len(parts(optimizer)) if scheduler is None else \
            scheduler.schedulers if isinstance(scheduler, Schedulers) else [scheduler]
        if scheduler is not None:
            started = attach(scheduler, inner, list(meta.granularity), start=shadows is None)
            shadows = started if shadows is None else shadows
        if "lr" in meta.granularity and any(s is None and any("initial_lr" in g for g in part.param_groups)
                                            for s, part in zip(driven, parts(optimizer))):
            raise ValueError("the optimizer has an LR scheduler attached and lr is meta-learned: "
                             "pass the scheduler to GimliSolver(scheduler=...) so the unroll "
                             "follows it (the learned lr is then its base lr)")
        return cls(model, loss_fn, val_loss_fn, meta, inner, names, frozen, scheduler, Slots(model),
                   shadows)

    # --- the split of Algorithm 1, line 2 -------------------------------------------------
    def split(self, steps: int) -> Split:
        """φ^opt, φ^loss ← split(φ): the hyperparameter values the unroll and sweep use
        (detached), which of them are learned, φ^loss as leaf tensors, and the
        schedule of a J-step unroll."""
        stepwise = self.meta.stepwise()
        if stepwise and steps != self.meta.steps:
            raise ValueError(f"{', '.join(sorted(stepwise))} is learned per step over "
                             f"{self.meta.steps} steps (MetaParams(steps=...)), but this unroll has "
                             f"{steps}: give {self.meta.steps} training batches (or steps=)")
        values = [self.step_hypers(j, differentiable=False) for j in range(steps)] if stepwise else []
        return Split(self.hypers(differentiable=False), frozenset(self.meta.granularity),
                     self.loss_leaves(), self.schedule(steps), values)

    def schedule(self, steps: int) -> Schedule | None:
        if self.scheduler is None:
            return None
        return build_schedule(self.scheduler, self.inner, steps, frozenset(self.meta.granularity),
                              self.shadows)

    def loss_leaves(self) -> list[Tensor]:
        """φ^loss as a list of leaf tensors: the loss meta-parameters and, when θ₀ is
        meta-learned, the model parameters the optimizer does not hold (they enter
        every G_j and L^val the way φ^loss does); those with requires_grad=False are
        constants."""
        leaves: list[Tensor] = [p for p in self.meta.loss.parameters() if p.requires_grad]
        if self.meta.init is not None:
            params = dict(self.module.named_parameters())
            leaves += [params[n] for n in self.frozen if params[n].requires_grad]
        return leaves

    def trained(self) -> list[bool]:
        """Per optimizer tensor: whether it steps. ``torch.optim`` skips a tensor whose
        ``.grad`` is None, as it stays for one with requires_grad=False."""
        return [p.requires_grad for p in self.inner.params]

    def hypers(self, *, differentiable: bool) -> dict[str, list[Tensor]]:
        """Every hyperparameter per tensor: meta-learned ones from φ^opt, the rest (and
        those learned per step, which :meth:`step_hypers` gives) from the optimizer's
        param_groups."""
        # with a scheduler, the un-scheduled lr is the scheduler's base lr
        hp = self.inner.constant_hypers(None if self.scheduler is None else
                                        {"lr": base_lrs(self.inner, self.scheduler)})
        for name in self.meta.granularity:
            if name in self.meta.stepwise():        # (per step: Split.per_step)
                continue
            values = self.meta.expand(name) if differentiable else self.meta.hyper_values(name)
            hp[name] = cast(list[Tensor], values)       # (None for another optimizer's tensor)
        return hp

    def step_hypers(self, j: int, *, differentiable: bool) -> dict[str, list[Tensor]]:
        """Step j's values of the hyperparameters learned per step, per tensor."""
        return {name: cast(list[Tensor], [v if differentiable or v is None else v.detach()
                                          for v in self.meta.expand(name, j)])
                for name in self.meta.stepwise()}

    # --- evaluating the losses at θ -----------------------------------------------------
    def view(self, theta: list[Tensor], buffers: dict[str, Tensor]) -> FunctionalModel:
        """The model at θ (one tensor per optimizer tensor), parameters in the module's order."""
        given = dict(zip(self.names, theta))
        params = {}
        for name, p in self._held if self._held is not None else self.module.named_parameters():
            if name in given:
                params[name] = given[name]
            else:                               # not in the optimizer: fixed, or φ^loss under init=
                params[name] = p if self.meta.init is not None and p.requires_grad else p.detach()
        return FunctionalModel(self.module, params, buffers, slots=self.slots)

    def buffers(self) -> dict[str, Tensor]:
        """A private copy of the model's buffers, for one unroll to update."""
        return {n: b.clone() for n, b in self.module.named_buffers()}

    def train_loss(self, theta: list[Tensor], buffers: dict[str, Tensor], batch: Any, *,
                   checked: bool = True) -> Tensor:
        """ℓ(θ, φ^loss) on ``batch``; ``checked``: raise NonFiniteError on an inf or NaN loss
        (a host sync; the unroll checks every step's at once instead: Unroll.check)."""
        loss = _scalar(self.loss_fn(self.view(theta, buffers), batch, self.meta), "loss_fn",
                       checked=checked)
        if self.proximal:               # toward θ₀, the model's own (meta-learned) weights
            loss = loss + self.proximal / 2 * sum(((t - p) ** 2).sum() for t, p in zip(theta, self.inner.params)
                                                  if p.requires_grad)
        return loss

    def val_loss(self, theta: list[Tensor], buffers: dict[str, Tensor], batch: Any) -> Tensor:
        model = self.view(theta, buffers)
        if self.val_mode is not None:           # a view in that mode; the module is not changed
            model = model.eval() if self.val_mode == "eval" else model.train()
        if self.val_loss_fn is None:
            return _scalar(self.loss_fn(model, batch, self.meta), "loss_fn (as the validation loss)")
        return _scalar(self.val_loss_fn(model, batch, self.meta), "val_loss_fn")

    def inner_grads(self, loss: Tensor, theta: list[Tensor], graph: bool = True,
                    leaves: Sequence[Tensor] = ()) -> list[Tensor | None]:
        """G_j = ∇_θ ℓ(θ'_j, φ^loss), keeping its graph if ``graph`` (Algorithm 1,
        line 5), followed by ∇ℓ w.r.t. each of ``leaves`` (φ^loss). A tensor the loss
        does not read gets ``None`` (and does not step)."""
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on the model's "
                             "parameters (it does not require grad): does it call the model it is "
                             "given (its first argument), not your module itself, and not under "
                             "torch.no_grad()?")
        grads = grad_of(loss, theta + list(leaves), create_graph=graph)
        if self.clip is not None:       # between backward() and step(), as a training loop does
            grads[:len(theta)] = self.clip(grads[:len(theta)], self.meta)
        if all(g is None for g in grads[:len(theta)]):
            raise ValueError("loss_fn returned a loss that does not depend on any parameter "
                             "the optimizer trains (with requires_grad=True): does it call the "
                             "model it is given (its first argument), not your module itself?")
        return grads


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def grad_of(outputs: Tensor | list[Tensor], inputs: list[Tensor], cotangents: list[Tensor] | None = None,
            *, create_graph: bool = False) -> list[Tensor | None]:
    """``torch.autograd.grad`` over the inputs that require grad; None for the others
    (a constant, requires_grad=False) and for inputs the outputs do not reach.

    The unroll and the sweep call this twice a step (G_j, and the Hessian-vector
    product), with tensors whose shapes match by construction: on plain tensors it goes
    to the autograd engine as ``torch.autograd.grad`` does, without the argument checks
    it repeats on every call (about 20 µs of Python a call)."""
    index = [i for i, x in enumerate(inputs) if x.requires_grad]
    out: list[Tensor | None] = [None] * len(inputs)
    if index:
        chosen = [inputs[i] for i in index]
        outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        if cotangents is None and all(o.dim() == 0 for o in outs):
            cotangents = [torch.ones_like(o) for o in outs]        # (as autograd does for a loss)
        if _engine is not None and cotangents is not None and len(cotangents) == len(outs) and \
                all(type(t) in _PLAIN for group in (outs, chosen, cotangents) for t in group):
            found = _engine(tuple(outs), tuple(cotangents), create_graph, create_graph, tuple(chosen),
                            True, accumulate_grad=False)
        else:
            found = torch.autograd.grad(outputs, chosen, grad_outputs=cotangents,
                                        create_graph=create_graph, allow_unused=True)
        for i, g in zip(index, found):
            out[i] = g
    return out


# torch.autograd.grad's call into the engine (absent from older torch: then grad itself), and
# the tensor types that need no __torch_function__ dispatch on the way
_engine = getattr(torch.autograd.graph, "_engine_run_backward", None)
_PLAIN = (Tensor, nn.Parameter)


class values_only:
    """``with values_only():`` records no graph, as ``torch.no_grad()``, for the unroll's
    step and the sweep's VJP, each entered once a step: without ``torch.no_grad``'s
    decorator machinery (about 3 µs a use)."""

    __slots__ = ("was",)

    def __enter__(self) -> None:
        self.was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch._C._set_grad_enabled(self.was)


def _weight_normed(model: nn.Module) -> list[str]:
    """The submodules that apply torch's weight norm: the parametrization
    (``nn.utils.parametrizations.weight_norm``) or the older hook (``nn.utils.weight_norm``)."""
    found = []
    for name, module in model.named_modules():
        plists = getattr(module, "parametrizations", None)
        hooks = list(module._forward_pre_hooks.values())
        if (plists is not None and any(type(p).__name__ == "_WeightNorm" for ps in plists.values() for p in ps)) \
                or any(type(h).__name__ == "WeightNorm" and hasattr(h, "dim") for h in hooks):
            found.append(name or type(model).__name__)
    return found


@functools.cache
def weight_norm_hvp_error(device: str) -> float:
    """How far the second derivative of ``torch._weight_norm`` on ``device`` is from finite
    differences of its gradient (float64, a small nonlinear loss, the largest relative error
    of a Hessian-vector product): about 1e-10 where torch differentiates it right. (torch
    2.13 on the CPU: 0.04 to 5 depending on the dimension; written out as g·v/‖v‖, 1e-10.)"""
    gen = torch.Generator().manual_seed(0)
    v, g, x, u, w = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)
                     for shape in ((4, 3), (4, 1), (5, 3), (4, 3), (4, 1)))

    def grads(a: Tensor, b: Tensor, graph: bool) -> tuple[Tensor, ...]:
        loss = torch.tanh(x @ torch._weight_norm(a, b, 0).T).pow(2).sum()
        return torch.autograd.grad(loss, (a, b), create_graph=graph)

    with torch.enable_grad():
        a, b = v.clone().requires_grad_(), g.clone().requires_grad_()
        hvp = torch.autograd.grad(grads(a, b, True), (a, b), (u, w))
        h = 1e-6
        plus = grads((v + h * u).requires_grad_(), (g + h * w).requires_grad_(), False)
        minus = grads((v - h * u).requires_grad_(), (g - h * w).requires_grad_(), False)
    return max(float((e - (p - q) / (2 * h)).abs().max() / ((p - q) / (2 * h)).abs().max())
               for e, p, q in zip(hvp, plus, minus))


def _check_weight_norm(model: nn.Module) -> None:
    """Warn where the model applies torch's weight norm and this torch's second derivative of
    it is wrong on the model's device: no exact hypergradient goes through it (gimli's, an
    autograd unroll's, or any other method's built on autograd)."""
    places = _weight_normed(model)
    if not places:
        return
    device = str(next(model.parameters()).device)
    try:
        error = weight_norm_hvp_error(device)
    except RuntimeError:                        # (a device without float64: not checked)
        return
    if error > 1e-6:
        warnings.warn(f"the model applies torch's weight norm ({', '.join(places)}), whose second "
                      f"derivative in this torch ({torch.__version__}, on {device}) is off by "
                      f"{error:.2g} (relative) from finite differences of its gradient: every "
                      f"hypergradient through it is wrong, gimli's and any autograd unroll's. Write "
                      f"the weight norm out instead, as a parametrization computing g * v / "
                      f"v.norm(dim=..., keepdim=True) (torch.nn.utils.parametrize."
                      f"register_parametrization), whose second derivative autograd gets right",
                      GimliWarning, stacklevel=4)


def _check_dtypes(inner: InnerOptimizer, meta: MetaParams) -> None:
    """Meta-parameters live where the model's parameters do, in their dtype; for a
    reduced-precision model (bfloat16, float16) a hyperparameter's is float32, as
    ``torch.optim`` keeps hyperparameters at full precision (bfloat16 rounds 0.999 to
    1), and a loss parameter may be float32 too."""
    kinds = {(p.dtype, p.device) for p in inner.params}
    if len(kinds) != 1:
        return                  # a mixed model: each entry is the user's to place
    dtype, device = next(iter(kinds))
    wide = hyper_dtype(dtype)
    for name, p in meta.named_parameters():
        if name.startswith("init."):
            continue
        if p.device != device:
            raise ValueError(f"meta-parameter {name} is on {p.device}, the model's parameters on "
                             f"{device}: move it (or the module holding it) with .to({str(device)!r})")
        if name.removeprefix("hypers.") in meta.transform:
            if p.dtype != wide:
                raise ValueError(f"meta-parameter {name} is {p.dtype}, but a hyperparameter of a "
                                 f"{dtype} model is kept in {wide} (as torch.optim keeps it at full "
                                 f"precision): convert it with .to({wide})")
        elif p.dtype not in (dtype, wide):
            also = f" (or {wide})" if wide != dtype else ""
            raise ValueError(f"meta-parameter {name} is {p.dtype}, the model's parameters are {dtype}: "
                             f"convert it (or the module holding it) with .to({dtype}){also}")


def _scalar(loss: Any, who: str, *, checked: bool = True) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{who} must return a scalar tensor, got {shape}")
    if checked and not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(f"{who} returned a non-finite loss ({loss.item()})")
    return loss if loss.dim() == 0 else loss.reshape(())
