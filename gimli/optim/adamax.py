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

from ._core import (BETA, NONNEGATIVE, VJP, Hypers, group_float, reduce_to, step_count, step_tensor,
                   )

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")
GROUP_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}  # where param_groups keep them
# as torch.optim's constructor checks them: 0 ≤ β < 1, the rest ≥ 0
RANGES = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
          "weight_decay": NONNEGATIVE}


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: list[int]
    exp_avg: list[Tensor]
    exp_inf: list[Tensor]


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

    return State([step_count(torch_state)], [moment("exp_avg")], [moment("exp_inf")])


def write_state(state: State, i: int) -> dict[str, Any]:
    return {"step": step_tensor(state.step[i]), "exp_avg": state.exp_avg[i],
            "exp_inf": state.exp_inf[i]}


class _Forward(NamedTuple):
    """The intermediates of (X1)–(X5) for one tensor, shared by step and vjp."""

    g2: Tensor
    m1: Tensor
    decayed: Tensor     # β₂u, the first argument of (X3)
    fresh: Tensor       # |g₂| + ε, the second
    u1: Tensor
    c1: Tensor
    theta: Tensor


def _forward(flags: Flags, t: int, p: Tensor, m: Tensor, u: Tensor, g: Tensor, lr: Tensor,
             b1: Tensor, b2: Tensor, eps: Tensor, wd: Tensor) -> _Forward:
    g2 = (-g if flags.maximize else g) + wd * p                     # (X1)
    m1 = b1 * m + (1 - b1) * g2                                     # (X2)
    decayed, fresh = b2 * u, g2.abs() + eps
    u1 = torch.maximum(decayed, fresh)                              # (X3)
    c1 = 1 - b1**t                                                  # (X4)
    return _Forward(g2, m1, decayed, fresh, u1, c1, p - (lr / c1) * m1 / u1)   # (X5)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, t + 1, p, m, u, g, *hps)
           for p, t, m, u, g, *hps in zip(params, *state, grads, *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.m1 for f in new], [f.u1 for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adamax.md, eq. X6–X11)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_m: list[Tensor] = []
    S_u: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, t, m, u, g, P, M, U) in enumerate(zip(
            params, *state, grads, cot_params, cot_state.exp_avg, cot_state.exp_inf)):
        lr, b1, b2, eps, wd = (hp[k][i] for k in HYPERS)
        t = t + 1
        f = _forward(flags, t, p, m, u, g, lr, b1, b2, eps, wd)
        step_size = lr / f.c1
        update = f.m1 / f.u1                                        # θ' = θ − (γ/c₁)·update
        m1_bar = M - step_size * P / f.u1                           # (X6)
        u1_bar = U + step_size * P * update / f.u1                  # ∂θ'/∂u' = (γ/c₁) m'/u'² (X7)
        c1_bar = step_size * P * update / f.c1                      # ∂θ'/∂c₁ = (γ/c₁²) m'/u' (X7)
        # (X8) u' = max(β₂u, |g₂|+ε): 1 to the larger argument, ½ each at a tie
        to_decayed = (f.decayed > f.fresh).to(p.dtype) + 0.5 * (f.decayed == f.fresh).to(p.dtype)
        decayed_bar = to_decayed * u1_bar
        fresh_bar = (1 - to_decayed) * u1_bar
        S_m.append(b1 * m1_bar)                                     # S^m_j = β₁ m̄'          (X9)
        S_u.append(b2 * decayed_bar)                                # S^u_j = β₂ ā           (X9)
        g2_bar = (1 - b1) * m1_bar + f.g2.sign() * fresh_bar        # d|g₂|/dg₂ = sign, 0 at 0 (X10)
        b_out.append(P + wd * g2_bar)                               # b_j = P + λ ḡ₂         (X10)
        o_out.append(sign * g2_bar)                                 # o_j = s ḡ₂             (X10)
        contrib = {                                                 # (X11)
            "lr": lambda: -P * update / f.c1,
            "beta1": lambda: m1_bar * (m - f.g2) - c1_bar * t * b1 ** (t - 1),
            "beta2": lambda: decayed_bar * u,
            "eps": lambda: fresh_bar,
            "weight_decay": lambda: g2_bar * p,
        }
        for name in need:
            a_out[name].append(reduce_to(contrib[name](), hp[name][i]))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_m, S_u), o_out, a_out)  # type: ignore[arg-type]
