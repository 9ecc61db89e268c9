"""One hypergradient per library, for any :class:`tasks.Instance`.

``prepare(method, instance)`` builds what the method needs (a solver, a
higher- or torchopt-ready optimizer) and returns ``run(batches)``: one
computation over those training batches, returning the hypergradient as one
flat vector in a common order (θ₀ in model order, the lrs in group order, or
φ^loss), or ``None`` for the plain unroll. Building happens outside the timed
call; everything a library does per hypergradient happens inside it.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import functional_call

import gimli
from tasks import Batch, Instance

Run = Callable[[Sequence[Batch]], Tensor | None]

GIMLI_MODES = ("retain", "recompute", "budget")
# "compiled": retain with GimliSolver(compile=True); its first call (the warm-up) compiles
METHODS = ("plain",) + GIMLI_MODES + ("compiled", "autograd", "higher", "torchopt")


class Unsupported(Exception):
    """The library cannot express this task (the message says why)."""


def missing(method: str) -> str | None:
    """Why ``method`` cannot run here, or None."""
    if method not in ("higher", "torchopt"):
        return None
    try:
        importlib.import_module(method)
    except ImportError as e:
        return f"{method} cannot be imported ({e}); pip install -e '.[bench]'"
    return None


def snapshots(J: int) -> int:
    """The budget mode's snapshots: ⌈√J⌉ points held at once, the starting one included."""
    return max(1, math.ceil(math.sqrt(J)))


def prepare(method: str, inst: Instance) -> Run:
    J = len(inst.train)
    if method == "plain":
        return _plain(inst)
    if method in GIMLI_MODES or method == "compiled":
        solver = _solver(inst, method, J)
        return lambda batches: _flat(solver.hypergradient(batches, inst.val).values())
    if method == "autograd":
        solver = _solver(inst, "retain", J)
        return lambda batches: _flat(gimli.full_unroll_hypergradient(solver, batches, inst.val).values())
    if method == "higher":
        return _higher(inst)
    if method == "torchopt":
        return _torchopt(inst)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def _flat(grads: Any) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# --- the time unit: a plain training unroll with the real torch.optim ---------------------
def _plain(inst: Instance) -> Run:
    phi = {k: v.detach() for k, v in inst.phi_loss.items()}

    def run(batches: Sequence[Batch]) -> None:
        model = copy.deepcopy(inst.model)
        opt = inst.make_opt(model)
        for batch in batches:
            opt.zero_grad()
            inst.loss(model, dict(model.named_parameters()), batch, phi).backward()
            opt.step()
        return None
    return run


def plain_step(inst: Instance) -> Callable[[], None]:
    """One training step (zero_grad, forward, backward, step) of a model and optimizer
    that have already taken one, so the optimizer state exists before it."""
    phi = {k: v.detach() for k, v in inst.phi_loss.items()}
    model = copy.deepcopy(inst.model)
    opt = inst.make_opt(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        inst.loss(model, dict(model.named_parameters()), inst.train[0], phi).backward()
        opt.step()
    step()
    return step


def loss_hvp(inst: Instance) -> Callable[[], None]:
    """One exact Hessian-vector product of the training loss by plain autograd (a
    forward, G = ∇ℓ with its graph, then ∇⟨v, G⟩): the least any exact sweep step
    holds at once, whatever the library."""
    phi = {k: v.detach() for k, v in inst.phi_loss.items()}
    names = [n for n, _ in inst.model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in inst.model.parameters()]
    v = [torch.randn_like(t) for t in theta]

    def hvp() -> None:
        params = dict(zip(names, theta))
        loss = inst.loss(lambda x: functional_call(inst.model, params, (x,)), params, inst.train[0], phi)
        G = torch.autograd.grad(loss, theta, create_graph=True)
        torch.autograd.grad(G, theta, grad_outputs=v)
    return hvp


# --- gimli ---------------------------------------------------------------------------------
def _solver(inst: Instance, memory: str, J: int) -> gimli.GimliSolver:
    compile = memory == "compiled"
    memory = "retain" if compile else memory
    model = inst.model
    opt = inst.make_opt(model)
    if inst.kind == "init":
        meta = gimli.MetaParams(init=model)
    elif inst.kind == "lr":
        meta = gimli.MetaParams(opt, {"lr": inst.granularity})
    else:
        meta = gimli.MetaParams(loss={k: v.clone() for k, v in inst.phi_loss.items()})
    keys = list(inst.phi_loss)

    def loss_fn(m: gimli.FunctionalModel, batch: Batch, meta: gimli.MetaParams) -> Tensor:
        phi = {k: cast(Tensor, meta[k]) for k in keys}     # (φ^loss entries here are tensors)
        return inst.loss(m, dict(m.named_parameters()), batch, phi)

    def val_loss_fn(m: gimli.FunctionalModel, batch: Batch, meta: gimli.MetaParams) -> Tensor:
        return inst.val_loss(m, batch)

    return gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=val_loss_fn, memory=memory,
                             snapshots=snapshots(J) if memory == "budget" else None, compile=compile)


def _meta_leaves(inst: Instance) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Fresh leaves for the learned lrs (one per group) and for φ^loss."""
    lr = None
    if inst.kind == "lr":
        dtype = next(inst.model.parameters()).dtype
        lr = torch.full((len(inst.lr_groups),), float(inst.opt_kwargs["lr"]), dtype=dtype,
                        requires_grad=True)
    phi = {k: v.detach().clone().requires_grad_(inst.kind == "loss") for k, v in inst.phi_loss.items()}
    return lr, phi


def _wrt(inst: Instance, lr: Tensor | None, phi: dict[str, Tensor]) -> list[Tensor]:
    if inst.kind == "init":
        return list(inst.model.parameters())
    if inst.kind == "lr":
        assert lr is not None
        return [lr]
    return list(phi.values())


# --- higher (Grefenstette et al.): a monkey-patched model and a differentiable optimizer ----
def _higher(inst: Instance) -> Run:
    import higher

    model, names = inst.model, [n for n, _ in inst.model.named_parameters()]
    opt = inst.make_opt(model)          # param groups = lr groups: override gives one lr per group
    lr, phi = _meta_leaves(inst)

    def run(batches: Sequence[Batch]) -> Tensor:
        override = None if lr is None else {"lr": list(lr.unbind())}
        with higher.innerloop_ctx(model, opt, copy_initial_weights=inst.kind != "init",
                                  override=override) as (fmodel, diffopt):
            for batch in batches:
                diffopt.step(inst.loss(fmodel, dict(zip(names, fmodel.fast_params)), batch, phi))
            val = inst.val_loss(fmodel, inst.val)
            return _flat(torch.autograd.grad(val, _wrt(inst, lr, phi)))
    return run


# --- torchopt: the functional API (optax-style update + apply_updates, inplace=False) -------
def _torchopt(inst: Instance) -> Run:
    import torchopt

    model = inst.model
    names = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(names)}
    groups = [[index[n] for n in g] for g in inst.lr_groups]   # one functional optimizer per group
    lr, phi = _meta_leaves(inst)
    kw = {k: v for k, v in inst.opt_kwargs.items() if k != "lr"}
    if inst.opt_class is torch.optim.Adam:
        make: Callable[[Any], Any] = lambda rate: torchopt.adam(rate, **kw)
    elif inst.opt_class is torch.optim.SGD:
        make = lambda rate: torchopt.sgd(rate, **kw)
    else:
        raise Unsupported(f"no torchopt counterpart written for {inst.opt_class.__name__}")

    def run(batches: Sequence[Batch]) -> Tensor:
        if inst.kind == "init":
            theta: list[Tensor] = list(model.parameters())       # θ₀ itself: the meta-parameter
        else:
            theta = [p.detach().requires_grad_() for p in model.parameters()]
        rates = [float(inst.opt_kwargs["lr"])] * len(groups) if lr is None else list(lr.unbind())
        opts = [make(rate) for rate in rates]
        states = [o.init(tuple(theta[i] for i in g)) for o, g in zip(opts, groups)]

        def forward(x: Tensor) -> Tensor:
            return functional_call(model, dict(zip(names, theta)), (x,))

        for batch in batches:
            loss = inst.loss(forward, dict(zip(names, theta)), batch, phi)
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            for k, (o, g) in enumerate(zip(opts, groups)):
                updates, states[k] = o.update(tuple(grads[i] for i in g), states[k], inplace=False)
                new = torchopt.apply_updates(tuple(theta[i] for i in g), updates, inplace=False)
                for i, t in zip(g, new):
                    theta[i] = t
        val = inst.val_loss(forward, inst.val)
        return _flat(torch.autograd.grad(val, _wrt(inst, lr, phi)))
    return run
