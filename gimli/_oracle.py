"""The test oracle: a full autograd unroll (create_graph through every step).

Obviously correct and memory-hungry: the same losses and the same pure
optimizer steps as the solver, differentiated end to end by autograd instead
of by the hand-written sweep. Used by the tests and by users checking their
own hypergradients.
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
    :meth:`GimliSolver.hypergradient`. Changes nothing of the user's."""
    with torch.enable_grad():
        return _full_unroll(solver.problem, train_batches, val_batch)


def _full_unroll(problem: Problem, train_batches: Sequence[Any], val_batch: Any) -> dict[str, Tensor]:
    hp = problem.hypers(differentiable=True)
    buffers = problem.buffers()
    if problem.meta.init is not None:
        theta = list(problem.inner.params)          # θ₀ is itself the meta-parameter
    else:
        theta = [p.detach().clone().requires_grad_() for p in problem.inner.params]
    state = problem.inner.read_state()
    schedule = problem.schedule(len(train_batches))
    for j, batch in enumerate(train_batches):
        G = problem.inner_grads(problem.train_loss(theta, buffers, batch), theta)
        theta, state = problem.inner.step(theta, state, G, hp if schedule is None else schedule.at(j, hp))
    val = problem.val_loss(theta, buffers, val_batch)
    named = list(problem.meta.named_parameters())
    grads = torch.autograd.grad(val, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
