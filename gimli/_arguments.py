"""Checks of what the user hands the solver, with messages a newcomer can act on."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._meta import MetaParams
from ._problem import ValLossFn
from .optim._joint import Joint

_ORDER = "GimliSolver(model, loss_fn, opt, meta_params, ...)"


def check_positional(model: Any, loss_fn: Any, opt: Any, meta: Any) -> None:
    """Each positional argument's type, with the order spelled out when they are swapped."""
    expected = [("model", model, nn.Module, "an nn.Module"),
                ("loss_fn", loss_fn, None, "a function loss_fn(model, batch, meta)"),
                ("opt", opt, torch.optim.Optimizer, "a torch.optim optimizer (or a list of them)"),
                ("meta_params", meta, MetaParams, "a gimli.MetaParams")]
    for position, (name, value, kind, what) in enumerate(expected, 1):
        if name == "opt" and (isinstance(value, Joint) or isinstance(value, (list, tuple)) and value
                              and all(isinstance(o, torch.optim.Optimizer) for o in value)):
            continue            # several optimizers, each over its own tensors
        wrong = (not callable(value) or isinstance(value, (torch.optim.Optimizer, MetaParams))) \
            if kind is None else not isinstance(value, kind)
        if wrong:
            raise TypeError(f"{_ORDER}: argument {position} ({name}) must be {what}, not "
                            f"{type(value).__name__} (are the arguments in this order?)")
    if not _accepts(loss_fn, 3):
        raise TypeError("loss_fn is called as loss_fn(model, batch, meta) (meta reads the loss "
                        "meta-parameters: meta[name]), but it does not take three arguments")


def _accepts(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when unknown)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:          # no signature (a builtin): assume it fits
        return True
    return True


def val_loss(fn: Callable[..., Any] | None) -> ValLossFn | None:
    """``val_loss_fn`` as ``(model, batch, meta)``, the way ``loss_fn`` is called; one
    written as ``(model, batch)`` still works, called without ``meta``, with a
    DeprecationWarning."""
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"val_loss_fn must be a function val_loss_fn(model, batch, meta), not "
                        f"{type(fn).__name__}")
    if _accepts(fn, 3):
        return fn
    if _accepts(fn, 2):
        warnings.warn("val_loss_fn(model, batch) is deprecated: take meta too, as loss_fn does "
                      "(val_loss_fn(model, batch, meta)); the two-argument form is called "
                      "without it for now", DeprecationWarning, stacklevel=3)
        return lambda model, batch, meta: fn(model, batch)
    raise TypeError("val_loss_fn is called as val_loss_fn(model, batch, meta), as loss_fn is, "
                    "but it does not take three arguments")


def check_batches(train_batches: Any) -> None:
    """A single batch given where a list of J batches is expected."""
    if isinstance(train_batches, Tensor):
        raise TypeError("train_batches must be a list of batches, one per inner step, not a "
                        "tensor: for one step on a batch b, pass [b]")
    if isinstance(train_batches, tuple) and train_batches and \
            all(isinstance(b, Tensor) for b in train_batches):
        raise TypeError(f"train_batches is a tuple of {len(train_batches)} tensors, which looks "
                        f"like one batch (x, y); pass a list of batches, one per inner step: "
                        f"[(x, y)] for one step, [(x, y)] * J to take J steps on it")


def check_meta_opt_type(meta_opt: Any) -> None:
    if not isinstance(meta_opt, torch.optim.Optimizer):
        raise TypeError(f"meta_opt must be a torch.optim optimizer over meta_params.parameters(), "
                        f"e.g. torch.optim.Adam(meta.parameters(), lr=1e-3), not "
                        f"{type(meta_opt).__name__}")


def check_meta_opt(meta_opt: Any, meta: MetaParams, learned: Sequence[str]) -> None:
    """The meta-optimizer holds every learned meta-parameter and nothing else (a frozen
    meta-parameter, requires_grad=False, it may hold: it never gets a gradient)."""
    check_meta_opt_type(meta_opt)
    held = {id(p) for g in meta_opt.param_groups for p in g["params"]}
    ours = {id(p) for p in meta.parameters()}
    if held - ours:
        raise ValueError(f"meta_opt holds {len(held - ours)} tensor(s) that are not "
                         f"meta-parameters: build it over meta_params.parameters()")
    params = dict(meta.named_parameters())
    missing = [n for n in learned if id(params[n]) not in held]
    if missing:
        raise ValueError(f"meta_opt does not hold the meta-parameter(s) {', '.join(missing)}, "
                         f"so they would never be learned: build it over "
                         f"meta_params.parameters()")


def task_pairs(tasks: Iterable[Any], train_batches: Any, val_batch: Any) -> list[tuple[Any, Any]]:
    """``tasks=`` as a list of (train_batches, val_batch) pairs, or an error saying what it is."""
    if train_batches is not None or val_batch is not None:
        raise ValueError("give either tasks= or train_batches/val_batch, not both")
    if isinstance(tasks, tuple) and len(tasks) == 2 and not isinstance(tasks[0], tuple):
        raise ValueError("tasks= is a list of (train_batches, val_batch) pairs, one per "
                         "task; for one task pass train_batches and val_batch instead")
    pairs = list(tasks)
    if not pairs:
        raise ValueError("tasks= holds no task")
    for k, task in enumerate(pairs):
        if not (isinstance(task, (tuple, list)) and len(task) == 2):
            raise TypeError(f"tasks= is a list of (train_batches, val_batch) pairs, one per "
                            f"task; tasks[{k}] is a {type(task).__name__}"
                            + (f" of {len(task)}" if isinstance(task, (tuple, list)) else ""))
    return [(train, val) for train, val in pairs]
