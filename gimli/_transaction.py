"""A meta-step is all or nothing, and a commit writes the unroll's end into the user's objects.

:class:`Snapshot` copies what a meta-step may change (the meta-parameters and their
``.grad``, the meta-optimizer's state, the optimizer's param groups, the scheduler,
the data streams' positions, torch's random state and, for a commit, the model and
the optimizer's state) and puts it back, in place, if the step fails (``with
Snapshot.take(solver):``): the user's objects stay the very objects they were (a
learned optimizer's network is restored into the same module).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from ._data import Mark, Stream
from ._unroll import Point

if TYPE_CHECKING:
    from ._solver import GimliSolver


class _Group(NamedTuple):
    values: dict[str, Any]                      # every entry but "params" and modules, copied
    modules: dict[str, tuple[nn.Module, dict[str, Tensor]]]    # module entries, tensors copied


def _take_group(group: dict[str, Any]) -> _Group:
    values, modules = {}, {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, nn.Module):
            modules[key] = (value, {k: t.detach().clone()
                                    for k, t in value.state_dict(keep_vars=True).items()})
        else:
            values[key] = copy.deepcopy(value)
    return _Group(values, modules)


def _restore_group(group: dict[str, Any], saved: _Group) -> None:
    for key in [k for k in group if k != "params" and k not in saved.values and k not in saved.modules]:
        del group[key]                          # an entry the failed step added
    group.update(copy.deepcopy(saved.values))
    for key, (module, tensors) in saved.modules.items():
        group[key] = module                     # the very module, its tensors as they were
        with torch.no_grad():
            for name, t in module.state_dict(keep_vars=True).items():
                t.copy_(tensors[name])


class Snapshot(NamedTuple):
    """What a meta-step may change, copied, so that a failed step can be undone."""

    meta: list[Tensor] | None                   # the meta-parameters, with meta=True
    grads: list[Tensor | None] | None
    meta_opt: dict[str, Any] | None
    groups: list[_Group] | None                 # the optimizer's param groups, with meta=True
    scheduler: dict[str, Any] | None            # with meta=True or commit=True
    streams: list[tuple[Stream, Mark]]          # always: a failed call draws no batch
    rng: tuple[Tensor, list[Tensor] | None]     # and no random number (dropout's, a loader's)
    extra: list[tuple[Any, Any]]                # (object, its snapshot()) for restore()
    model: dict[str, Tensor] | None             # with commit: the model's weights and buffers
    inner_state: dict[Any, Any] | None          # and the optimizer's state
    solver: Any                                 # whose state this is

    @classmethod
    def take(cls, solver: GimliSolver, *, meta: bool = True, commit: bool = False) -> Snapshot:
        """``meta``: what a meta-update changes; ``commit``: what a commit changes."""
        params = list(solver.meta.parameters())
        opt = solver.problem.inner.torch_optimizer
        scheduler = solver.problem.scheduler
        module = solver.problem.module
        streams = [(s, s.mark()) for s in (solver.train_data, solver.val_data) if s is not None]
        extra = [(obj, obj.snapshot()) for obj in solver.transactional()] if meta or commit else []
        return cls([p.detach().clone() for p in params] if meta else None,
                   [None if p.grad is None else p.grad.clone() for p in params] if meta else None,
                   copy.deepcopy(solver.meta_opt.state_dict())
                   if meta and solver.meta_opt is not None else None,
                   [_take_group(g) for g in opt.param_groups] if meta else None,
                   copy.deepcopy(scheduler.state_dict())
                   if scheduler is not None and (meta or commit) else None,
                   streams, _rng(), extra,
                   {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
                   if commit else None,
                   {p: copy.deepcopy(s) for p, s in opt.state.items()} if commit else None,
                   solver)

    def restore(self, solver: GimliSolver, *, keep_draws: bool = False) -> None:
        """Put everything back; ``keep_draws``: all but the batches drawn and the random
        numbers drawn (a skipped step uses them up)."""
        if self.meta is not None and self.grads is not None:
            with torch.no_grad():
                for p, value, grad in zip(solver.meta.parameters(), self.meta, self.grads):
                    p.copy_(value)
                    p.grad = grad
        if solver.meta_opt is not None and self.meta_opt is not None:
            solver.meta_opt.load_state_dict(copy.deepcopy(self.meta_opt))
        opt = solver.problem.inner.torch_optimizer
        for group, saved in zip(opt.param_groups, self.groups or []):
            _restore_group(group, saved)
        if self.scheduler is not None:
            solver.problem.scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        for stream, mark in self.streams if not keep_draws else []:
            stream.rewind(mark)
        if not keep_draws:
            torch.set_rng_state(self.rng[0])
            if self.rng[1] is not None:
                torch.cuda.set_rng_state_all(self.rng[1])
        for obj, saved_state in self.extra:
            obj.restore(saved_state)
        if self.model is not None and self.inner_state is not None:
            with torch.no_grad():
                for name, t in solver.problem.module.state_dict(keep_vars=True).items():
                    t.copy_(self.model[name])
            opt.state.clear()
            opt.state.update(self.inner_state)

    def settle(self) -> None:
        """The step went through: the streams forget the batches they lent it."""
        for stream, _ in self.streams:
            stream.settle()

    # ``with Snapshot.take(solver) as saved:`` restores it if the block raises, settles if not
    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            self.settle()
        else:
            self.restore(self.solver)


def _rng() -> tuple[Tensor, list[Tensor] | None]:
    """torch's global random states (the CPU's, and the GPUs' where CUDA is in use)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return torch.get_rng_state(), cuda


def commit(solver: GimliSolver, final: Point, steps: int) -> None:
    """θ'_J, σ_J and the buffers into the user's model and optimizer; the scheduler J
    steps on: the same as J steps of the real optimizer (and scheduler) on those batches."""
    problem = solver.problem
    inner = problem.inner
    opt = inner.torch_optimizer
    states = {i: inner.write_state(final.state, i) for i, p in enumerate(inner.params)
              if final.stepped[i] or opt.state.get(p)}      # torch.optim keeps state for these
    with torch.no_grad():
        for p, t in zip(inner.params, final.theta):
            p.copy_(t)
        buffers = dict(problem.module.named_buffers())
        for name, b in final.buffers.items():
            buffers[name].copy_(b)
    for i, state in states.items():
        opt.state[inner.params[i]] = state
    if problem.scheduler is not None:
        with warnings.catch_warnings():     # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                problem.scheduler.step()
