"""One row per supported optimizer: it drives forward, local and global parity.

Adding an optimizer = one file in gimli/optim + one row here + one row of typical
settings (gimli/optim/_settings.py) + one proof; test_capabilities fails while a row
is missing. Each row gives a hypothesis strategy for the optimizer's constructor keyword
arguments (flags and hyperparameters, in ranges where an unroll of a few steps
stays well conditioned in float64) and the hyperparameters gimli can learn.
A row whose torch class this torch lacks is skipped, saying which; one whose gimli
file is missing fails.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import strategies as st

from gimli.optim import BUILTIN, SUPPORTED, bind


class OptimRow(NamedTuple):
    name: str                                   # the torch.optim class name
    kwargs: st.SearchStrategy[dict[str, Any]]
    learnable: tuple[str, ...]
    matrices_only: bool = False                 # Muon steps 2-D parameters only

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        cls = getattr(torch.optim, self.name, None)
        if cls is None:
            pytest.skip(f"this torch ({torch.__version__}) has no torch.optim.{self.name}")
        if cls not in SUPPORTED:
            pytest.fail(f"gimli has no rule for {self.name} (gimli/optim/{BUILTIN[self.name]}.py)")
        return cls

    def shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes for the single-step tests: a matrix and vectors, or matrices."""
        return [(3, 2), (2, 4), (4, 3)] if self.matrices_only else [(3, 2), (2,), (4,)]


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


def _betas(lo2: float = 0.9) -> st.SearchStrategy[tuple[float, float]]:
    return st.tuples(st.floats(0.5, 0.95), st.floats(lo2, 0.999))


@st.composite
def _adam(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.05)), betas=draw(_betas()),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def _adagrad(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.2)), lr_decay=draw(_off_or(0.01, 0.5)),
                weight_decay=draw(_off_or(1e-3, 0.1)), eps=draw(st.floats(1e-8, 1e-2)),
                initial_accumulator_value=draw(_off_or(0.01, 1.0)), maximize=draw(st.booleans()))


@st.composite
def _rmsprop(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.05)), alpha=draw(st.floats(0.8, 0.99)),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                momentum=draw(_off_or(0.1, 0.9)), centered=draw(st.booleans()),
                maximize=draw(st.booleans()))


@st.composite
def _adadelta(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(0.1, 1.0)), rho=draw(st.floats(0.5, 0.95)),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                maximize=draw(st.booleans()))


@st.composite
def _adamax(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.05)), betas=draw(_betas()),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                maximize=draw(st.booleans()))


@st.composite
def _nadam(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.05)), betas=draw(_betas()),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                momentum_decay=draw(st.floats(1e-3, 1e-2)),
                decoupled_weight_decay=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def _radam(draw: st.DrawFn) -> dict[str, Any]:
    # the rectification switch (ρ_t > 5) turns on only after ~6 steps whatever β₂ is; the
    # tests reach it through pre-steps (local parity) and long unrolls (global parity)
    return dict(lr=draw(st.floats(1e-3, 0.05)), betas=draw(_betas(0.5)),
                eps=draw(st.floats(1e-6, 1e-2)), weight_decay=draw(_off_or(1e-3, 0.1)),
                decoupled_weight_decay=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def _rprop(draw: st.DrawFn) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-3, 0.05)),
                etas=(draw(st.floats(0.3, 0.7)), draw(st.floats(1.1, 1.5))),
                step_sizes=(draw(st.floats(1e-6, 1e-3)), draw(st.floats(0.05, 1.0))),
                maximize=draw(st.booleans()))


@st.composite
def _asgd(draw: st.DrawFn) -> dict[str, Any]:
    # t0 small so that averaging starts within the unroll
    return dict(lr=draw(st.floats(1e-3, 0.05)), lambd=draw(st.floats(1e-4, 1e-2)),
                alpha=draw(st.floats(0.5, 1.0)), t0=draw(st.floats(0.5, 6.0)),
                weight_decay=draw(_off_or(1e-3, 0.1)), maximize=draw(st.booleans()))


@st.composite
def _adafactor(draw: st.DrawFn) -> dict[str, Any]:
    eps1 = draw(st.one_of(st.none(), st.floats(1e-8, 1e-3)))
    return dict(lr=draw(st.floats(1e-3, 0.05)), beta2_decay=draw(st.floats(-1.0, -0.5)),
                eps=(eps1, draw(st.floats(1e-4, 1e-2))), d=draw(st.floats(1.0, 2.0)),
                weight_decay=draw(_off_or(1e-3, 0.1)), maximize=draw(st.booleans()))


@st.composite
def _muon(draw: st.DrawFn) -> dict[str, Any]:
    a, b, c = 3.4445, -4.775, 2.0315
    # above a scale of about 1.04 the quintic's peak on [0, 1] exceeds its escape point and
    # the Newton–Schulz iterates of some singular values blow up (to 1e34 by 5 steps at 1.09):
    # Muon's update is then meaningless and its VJP a cancellation of terms of 1e7
    scale = draw(st.floats(0.9, 1.02))
    return dict(lr=draw(st.floats(1e-3, 0.05)), weight_decay=draw(_off_or(1e-3, 0.1)),
                momentum=draw(st.floats(0.5, 0.95)), nesterov=draw(st.booleans()),
                ns_coefficients=(a * scale, b * scale, c * scale), eps=draw(st.floats(1e-7, 1e-3)),
                ns_steps=draw(st.integers(1, 5)),
                adjust_lr_fn=draw(st.sampled_from([None, "original", "match_rms_adamw"])))


ADAM_HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")
OPTIM_DB: list[OptimRow] = [
    OptimRow("SGD", _sgd(), ("lr", "momentum", "dampening", "weight_decay")),
    OptimRow("Adam", _adam(), ADAM_HYPERS),
    OptimRow("AdamW", _adam(), ADAM_HYPERS),
    OptimRow("Adagrad", _adagrad(), ("lr", "lr_decay", "weight_decay", "eps")),
    OptimRow("RMSprop", _rmsprop(), ("lr", "alpha", "eps", "weight_decay", "momentum")),
    OptimRow("Adadelta", _adadelta(), ("lr", "rho", "eps", "weight_decay")),
    OptimRow("Adamax", _adamax(), ADAM_HYPERS),
    OptimRow("NAdam", _nadam(), ADAM_HYPERS + ("momentum_decay",)),
    OptimRow("RAdam", _radam(), ADAM_HYPERS),
    OptimRow("Rprop", _rprop(), ("lr", "etaminus", "etaplus", "step_size_min", "step_size_max")),
    OptimRow("ASGD", _asgd(), ("lr", "lambd", "alpha", "t0", "weight_decay")),
    OptimRow("Adafactor", _adafactor(), ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")),
    OptimRow("Muon", _muon(), ("lr", "weight_decay", "momentum", "ns_a", "ns_b", "ns_c", "eps"),
             matrices_only=True),
]
IDS = [row.name for row in OPTIM_DB]


def learnable_now(row: OptimRow, opt: torch.optim.Optimizer, *, meta: bool = True) -> tuple[str, ...]:
    """The row's hyperparameters that have an effect in every param group; with
    ``meta``, only those that can be meta-parameters (that reach θ)."""
    inner = bind(opt)
    off = set().union(*(inner.rule.inactive_hypers(f) for f in inner.flags))
    if meta:
        off |= set(inner.rule.no_hypergradient)
    return tuple(n for n in row.learnable if n not in off)


def granularities(opt: torch.optim.Optimizer, name: str) -> tuple[str, ...]:
    """The granularities the optimizer's rule allows for hyperparameter ``name``."""
    return bind(opt).rule.granularities_of(name)
