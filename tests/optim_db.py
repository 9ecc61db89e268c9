"""One row per supported optimizer: it drives forward, local and global parity.

Adding an optimizer = one file in gimli/optim + one row here + one proof.
Each row gives a hypothesis strategy for the optimizer's constructor keyword
arguments (flags and hyperparameters, in ranges where an unroll of a few steps
stays well conditioned in float64) and the hyperparameters gimli can learn.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st


class OptimRow(NamedTuple):
    cls: type[torch.optim.Optimizer]
    kwargs: st.SearchStrategy[dict[str, Any]]
    learnable: tuple[str, ...]


def _off_or(lo: float, hi: float) -> st.SearchStrategy[float]:
    """0 (the feature switched off) or a value in [lo, hi]."""
    return st.one_of(st.just(0.0), st.floats(lo, hi))


@st.composite
def _sgd(draw: st.DrawFn) -> dict[str, Any]:
    momentum = draw(_off_or(0.1, 0.95))
    nesterov = momentum > 0 and draw(st.booleans())
    return dict(lr=draw(st.floats(0.01, 0.2)), momentum=momentum,
                dampening=0.0 if nesterov else draw(_off_or(0.05, 0.5)),
                weight_decay=draw(_off_or(1e-3, 0.1)), nesterov=nesterov,
                maximize=draw(st.booleans()))


@st.composite
def _adam(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.05)),
                betas=(draw(st.floats(0.5, 0.95)), draw(st.floats(0.9, 0.999))),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def _adagrad(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.2)), lr_decay=draw(_off_or(0.01, 0.5)),
                weight_decay=draw(_off_or(1e-3, 0.1)), eps=draw(st.floats(1e-8, 1e-2)),
                initial_accumulator_value=draw(_off_or(0.01, 1.0)), maximize=draw(st.booleans()))


ADAM_HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")
OPTIM_DB: list[OptimRow] = [
    OptimRow(torch.optim.SGD, _sgd(), ("lr", "momentum", "dampening", "weight_decay")),
    OptimRow(torch.optim.Adam, _adam(), ADAM_HYPERS),
    OptimRow(torch.optim.AdamW, _adam(), ADAM_HYPERS),
    OptimRow(torch.optim.Adagrad, _adagrad(), ("lr", "lr_decay", "weight_decay", "eps")),
]
IDS = [row.cls.__name__ for row in OPTIM_DB]


def learnable_now(row: OptimRow, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The row's learnable hyperparameters that have an effect with these flags."""
    if row.cls is torch.optim.SGD and kwargs["momentum"] == 0:
        return ("lr", "weight_decay")
    return row.learnable
