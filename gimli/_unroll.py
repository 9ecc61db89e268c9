"""The forward unroll, Algorithm 1 lines 3–7.

Each θ'_j is a fresh leaf; G_j's graph reaches back only to θ'_j and φ^loss.
The optimizer step runs on detached values, so no graph spans two steps: the
whole dependency across steps is carried by the hand-written sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor

from ._problem import Problem
from ._schedule import Schedule


class Tape(NamedTuple):
    """What the sweep reads: θ'_0..θ'_J, σ_0..σ_J, G_0..G_{J−1} (with graphs)."""

    thetas: list[list[Tensor]]
    states: list[Any]
    grads: list[list[Tensor | None]]
    hypers: list[dict[str, list[Tensor]]]   # step j's hyperparameters (schedules included)
    buffers: dict[str, Tensor]
    train_losses: list[float]


def unroll(problem: Problem, hp: dict[str, list[Tensor]], schedule: Schedule | None,
           train_batches: Sequence[Any]) -> Tape:
    """J steps from copies of the model's weights and the optimizer's state, with
    hyperparameters ``hp`` (φ^opt's values, one per tensor) as scheduled."""
    inner = problem.inner
    buffers = problem.buffers()
    theta = [p.detach().clone() for p in inner.params]          # line 3: θ'_0 ← θ_t
    state = inner.read_state()                                  # line 3: opt'_0 ← opt_t
    tape = Tape([], [], [], [], buffers, [])
    for j, batch in enumerate(train_batches):                   # line 4
        hp_j = hp if schedule is None else schedule.at(j, hp)
        theta = [t.requires_grad_() for t in theta]
        loss = problem.train_loss(theta, buffers, batch)
        G = problem.inner_grads(loss, theta)                    # line 5, graph retained
        tape.thetas.append(theta)
        tape.states.append(state)
        tape.grads.append(G)
        tape.hypers.append(hp_j)
        tape.train_losses.append(loss.item())
        G_values = [None if g is None else g.detach() for g in G]
        theta, state = inner.step([t.detach() for t in theta], state, G_values, hp_j)  # line 6
    tape.thetas.append([t.requires_grad_() for t in theta])
    tape.states.append(state)
    return tape
