r"""Adagrad with lr_decay, weight decay, initial accumulator and maximize.

The update of ``torch.optim.Adagrad`` for one tensor at step t (the paper's
Appendix A.2, extended; proofs/adagrad.md, eq. G1–G4):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta                                   && (G1) \\
    \Sigma' &= \Sigma + g_2^2                                       && (G2) \\
    \eta_t &= \gamma / (1 + (t-1)\,\kappa), \qquad \delta = \sqrt{\Sigma'} + \epsilon  && (G3) \\
    \theta' &= \theta - \eta_t\, g_2 / \delta                       && (G4)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, κ = ``lr_decay``, λ = ``weight_decay``,
ε = ``eps``. Σ starts at ``initial_accumulator_value`` (set by ``torch.optim``
when the optimizer is built, so it is state, not a learnable hyperparameter).

Numerical guard: where Σ' is exactly 0, g_2 is 0, θ' does not depend on Σ'
there, and the cotangent of Σ' through √ is set to its true value 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import NONNEGATIVE, VJP, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "lr_decay", "weight_decay", "eps")


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: int
    sum: Tensor


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    return Flags(bool(group["maximize"])), {name: group_float(group, name) for name in HYPERS}


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    acc = torch_state.get("sum")
    if acc is None:
        acc = torch.full_like(param, group_float(group, "initial_accumulator_value"))
    return State(step_count(torch_state), acc.detach().clone())


class _Forward(NamedTuple):
    """The intermediates of (G1)–(G3), shared by step and vjp."""

    g2: Tensor
    acc1: Tensor        # Σ'
    root: Tensor        # √Σ'
    delta: Tensor
    decay: Tensor       # 1 + (t − 1)κ, the hyperparameters' shape
    eta: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor],
             after: State | None = None) -> _Forward:
    """(G1)–(G3); with ``after`` (the State :func:`step` produced), Σ' is read from it."""
    lr, kappa, wd, eps = (hp[k] for k in HYPERS)
    g2 = pc.coupled_decay(g, p, wd, flags.maximize)                 # (G1)
    acc1 = after.sum if after is not None else s.sum + g2 * g2     # (G2)
    decay = 1 + s.step * kappa                                      # (G3), s.step = t − 1
    root = acc1.sqrt()
    return _Forward(g2, acc1, root, root + eps, decay, lr / decay)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    return p - f.eta * f.g2 / f.delta, State(s.step + 1, f.acc1)    # (G4)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adagrad.md, eq. G5–G9)."""
    f = _forward(flags, p, s, g, hp, after)         # (after=: Σ' as step stored it)
    lr, kappa, wd, eps = (hp[k] for k in HYPERS)
    update = f.g2 / f.delta                                         # θ' = θ − η_t·update
    delta_bar = f.eta * P * update / f.delta                        # ∂θ'/∂δ = η_t g₂/δ²     (G5)
    root_bar = pc.sqrt_vjp(delta_bar, f.root)                       # guard: √ at Σ' = 0
    acc1_bar = root_bar if S.sum is None else S.sum + root_bar
    g2_bar = -f.eta * P / f.delta + 2 * f.g2 * acc1_bar             # (G6)
    b_out, o_out, wd_bar = pc.coupled_decay_vjp(P, g2_bar, p, wd, flags.maximize, need)   # (G8)
    eta_bar = -P * update
    t = s.step
    contrib = {                                                     # (G9)
        "lr": lambda: eta_bar / f.decay,
        "lr_decay": lambda: -eta_bar * lr * t / f.decay ** 2,
        "weight_decay": lambda: wd_bar,
        "eps": lambda: delta_bar,
    }
    return VJP(b_out, State(0, acc1_bar),                   # S_j = Σ̄'  (G7)
               o_out, {name: contrib[name]() for name in need})


RULE = Rule(
    hypers=HYPERS,
    ranges=dict.fromkeys(HYPERS, NONNEGATIVE),   # as torch.optim.Adagrad's constructor checks them
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    reads_after=True,
)
