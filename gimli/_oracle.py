"""The test oracle: a full autograd unroll (create_graph through every step).

Obviously correct and memory-hungry: the same losses and the same pure
optimizer steps as the solver, differentiated end to end by autograd instead
of by the hand-written sweep. Used by the tests and by users checking their
own hypergradients. With the solver's ``first_order`` it stops the gradient
through G_j's dependence on θ (not on φ^loss); with ``truncate=K`` it stops
every path into the first J − K steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._problem import Problem

if TYPE_CHECKING:
    from ._solver import GimliSolver


def full_unroll_hypergradient(solver: GimliSolver, train_batches: Sequence[Any],
                              val_batch: Any) -> dict[str, Tensor]:
    """∇_φ L^val(θ_J(φ)) by autograd through all J steps, keyed like
    :meth:`GimliSolver.hypergradient`, with the solver's scheduler and its
    ``first_order``/``truncate`` stop-gradients. Changes nothing of the user's."""
    with torch.enable_grad():
        return _full_unroll(solver.problem, list(train_batches), val_batch,
                            solver.first_order, solver.truncate)


def _detached_state(state: Any) -> Any:
    return type(state)(*([x.detach() if isinstance(x, Tensor) else x for x in field]
                         for field in state))


def _full_unroll(problem: Problem, train_batches: list[Any], val_batch: Any, first_order: bool,
                 truncate: int | None) -> dict[str, Tensor]:
    hp = problem.hypers(differentiable=True)
    hp_const = problem.hypers(differentiable=False)
    buffers = problem.buffers()
    if problem.meta.init is not None:
        theta = list(problem.inner.params)          # θ₀ is itself the meta-parameter
    else:
        theta = [p.detach().clone().requires_grad_(p.requires_grad) for p in problem.inner.params]
    state = problem.inner.read_state()
    schedule = problem.schedule(len(train_batches))
    cut = 0 if truncate is None else max(0, len(train_batches) - truncate)
    for j, batch in enumerate(train_batches):
        if j == cut and cut > 0:                    # truncation: stop-gradient at J − K
            theta = [t.detach().requires_grad_(trained) for t, trained in zip(theta, problem.trained())]
            state = _detached_state(state)
        hp_j = hp if j >= cut else hp_const
        hp_j = {**hp_j, **problem.step_hypers(j, differentiable=j >= cut)}     # (a learned schedule)
        hp_j = hp_j if schedule is None else schedule.at(j, hp_j)
        at = [t.detach().requires_grad_(trained) for t, trained in zip(theta, problem.trained())] \
            if first_order or j < cut else theta
        loss = problem.train_loss(at, buffers, batch)
        G = problem.inner_grads(loss, at, graph=j >= cut)
        theta, state = problem.inner.step(theta, state, G, hp_j)
    val = problem.val_loss(theta, buffers, val_batch)
    named = [(n, p) for n, p in problem.meta.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(val, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
