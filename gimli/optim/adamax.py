r"""Adamax (Adam with an infinity norm) with weight decay and maximize.

The update of ``torch.optim.Adamax`` for one tensor at step t (proofs/adamax.md, eq. X1–X5):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta                                              && (X1) \\
    m' &= \beta_1 m + (1-\beta_1)\,g_2                                         && (X2) \\
    u' &= \max(\beta_2 u,\ |g_2| + \epsilon)                                   && (X3) \\
    c_1 &= 1-\beta_1^{\,t}                                                     && (X4) \\
    \theta' &= \theta - (\gamma/c_1)\; m'/u'                                   && (X5)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, β = ``betas``, ε = ``eps``, λ = ``weight_decay``.
The state is m (``exp_avg``) and u (``exp_inf``), both created as zeros.

Kinks, with autograd's conventions (so that the closed form equals autograd on
:func:`step` everywhere; proofs/adamax.md §3): at a tie β₂u = |g₂| + ε of (X3) the
cotangent of u' is split half and half (``torch.maximum``'s backward, and
``torch.amax``'s even split over two equal entries in ``torch.optim``'s
``differentiable`` path); at g₂ = 0 the derivative of |g₂| is sign(0) = 0. Both are
the symmetric (central-difference) derivatives. No √ and no guard: u' ≥ ε > 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import ADAM_RANGES, BETAS_KEYS, VJP, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: int
    exp_avg: Tensor
    exp_inf: Tensor


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {
        "lr": group_float(group, "lr"),
        "beta1": group_float(group, "betas", 0),
        "beta2": group_float(group, "betas", 1),
        "eps": group_float(group, "eps"),
        "weight_decay": group_float(group, "weight_decay"),
    }
    return Flags(bool(group["maximize"])), hypers


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def moment(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    return State(step_count(torch_state), moment("exp_avg"), moment("exp_inf"))


class _Forward(NamedTuple):
    """The intermediates of (X1)–(X5), shared by step and vjp."""

    t: int
    g2: Tensor
    m1: Tensor
    decayed: Tensor     # β₂u, the first argument of (X3)
    fresh: Tensor       # |g₂| + ε, the second
    u1: Tensor
    c1: Tensor          # the hyperparameters' shape


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> _Forward:
    lr, b1, b2, eps, wd = (hp[k] for k in HYPERS)
    g2 = pc.coupled_decay(g, p, wd, flags.maximize)                 # (X1)
    m1 = pc.ema(s.exp_avg, g2, b1)                                  # (X2)
    decayed, fresh = b2 * s.exp_inf, g2.abs() + eps
    u1 = torch.maximum(decayed, fresh)                              # (X3)
    c1 = (hp if "c1" in hp else scalars(s, hp))["c1"]               # (X4)
    return _Forward(s.step + 1, g2, m1, decayed, fresh, u1, c1)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    return p - (hp["lr"] / f.c1) * f.m1 / f.u1, State(f.t, f.m1, f.u1)   # (X5)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adamax.md, eq. X6–X11)."""
    f = _forward(flags, p, s, g, hp)
    lr, b1, b2, eps, wd = (hp[k] for k in HYPERS)
    step_size = lr / f.c1
    update = f.m1 / f.u1                                            # θ' = θ − (γ/c₁)·update
    m1_bar = -step_size * P / f.u1                                  # (X6)
    if S.exp_avg is not None:
        m1_bar = S.exp_avg + m1_bar
    u1_bar = step_size * P * update / f.u1                          # ∂θ'/∂u' = (γ/c₁) m'/u'² (X7)
    if S.exp_inf is not None:
        u1_bar = S.exp_inf + u1_bar
    c1_bar = step_size * P * update / f.c1                          # ∂θ'/∂c₁ = (γ/c₁²) m'/u' (X7)
    # (X8) u' = max(β₂u, |g₂|+ε): 1 to the larger argument, ½ each at a tie
    to_decayed = pc.max_share(f.decayed, f.fresh)
    decayed_bar = to_decayed * u1_bar
    fresh_bar = (1 - to_decayed) * u1_bar
    S_m, m_g2_bar, b1_bar = pc.ema_vjp(m1_bar, s.exp_avg, f.g2, b1)   # S^m_j = β₁ m̄'   (X9)
    S_u = b2 * decayed_bar                                          # S^u_j = β₂ ā           (X9)
    g2_bar = m_g2_bar + f.g2.sign() * fresh_bar                     # d|g₂|/dg₂ = sign, 0 at 0 (X10)
    b_out, o_out, wd_bar = pc.coupled_decay_vjp(P, g2_bar, p, wd, flags.maximize, need)   # (X10)
    contrib = {                                                     # (X11)
        "lr": lambda: -P * update / f.c1,
        # ∂c₁/∂β₁ = −t β₁^(t−1)
        "beta1": lambda: b1_bar + c1_bar * pc.bias_correction_grad(b1, f.t),
        "beta2": lambda: decayed_bar * s.exp_inf,
        "eps": lambda: fresh_bar,
        "weight_decay": lambda: wd_bar,
    }
    return VJP(b_out, State(0, S_m, S_u),                   # b_j = P + λ ḡ₂, o_j = s ḡ₂
               o_out, {name: contrib[name]() for name in need})


def scalars(s: State, hp: dict[str, Tensor]) -> dict[str, Tensor]:
    """c₁ = 1 − β₁^t of this step (X4); formed before a compiled call (``Rule.scalars``),
    else by :func:`_forward` itself."""
    return {"c1": pc.bias_correction(hp["beta1"], s.step + 1)}


RULE = Rule(
    hypers=HYPERS,
    ranges=ADAM_RANGES,                 # as torch.optim's constructor checks them
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    group_keys=BETAS_KEYS, scalars=scalars,
)
