r"""Adadelta with weight decay and maximize.

The update of ``torch.optim.Adadelta`` for one tensor (proofs/adadelta.md, eq. D1–D5):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta                                       && (D1) \\
    v'  &= \rho\,v + (1-\rho)\,g_2^2                                    && (D2) \\
    \sigma &= \sqrt{v' + \epsilon}, \qquad \nu = \sqrt{u + \epsilon}    && (D3) \\
    d &= (\nu/\sigma)\,g_2, \qquad u' = \rho\,u + (1-\rho)\,d^2         && (D4) \\
    \theta' &= \theta - \gamma\,d                                       && (D5)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, ρ = ``rho``, ε = ``eps``, λ = ``weight_decay``.
The state is v (``square_avg``) and u (``acc_delta``), both created as zeros.

No guard is needed: v' ≥ 0 and u ≥ 0 (averages of squares), so both radicands are
≥ ε > 0 and every derivative exists; with ε = 0 ``torch.optim`` itself divides 0 by 0
at the first step and ε = 0 is outside the domain of this file.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._core import (NONNEGATIVE, VJP, Hypers, Interval, group_float, reduce_to, step_count,
                    step_tensor)

HYPERS = ("lr", "rho", "eps", "weight_decay")
# as torch.optim.Adadelta's constructor checks them: 0 ≤ ρ ≤ 1, the rest ≥ 0
RANGES = {"lr": NONNEGATIVE, "rho": Interval(0.0, 1.0), "eps": NONNEGATIVE,
          "weight_decay": NONNEGATIVE}


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: list[int]
    square_avg: list[Tensor]
    acc_delta: list[Tensor]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    return Flags(bool(group["maximize"])), {name: group_float(group, name) for name in HYPERS}


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def avg(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    return State([step_count(torch_state)], [avg("square_avg")], [avg("acc_delta")])


def write_state(state: State, i: int) -> dict[str, Any]:
    return {"step": step_tensor(state.step[i]), "square_avg": state.square_avg[i],
            "acc_delta": state.acc_delta[i]}


class _Forward(NamedTuple):
    """The intermediates of (D1)–(D5) for one tensor, shared by step and vjp."""

    g2: Tensor
    v1: Tensor
    sigma: Tensor
    nu: Tensor
    d: Tensor
    u1: Tensor
    theta: Tensor


def _forward(flags: Flags, p: Tensor, v: Tensor, u: Tensor, g: Tensor, lr: Tensor,
             rho: Tensor, eps: Tensor, wd: Tensor) -> _Forward:
    g2 = (-g if flags.maximize else g) + wd * p                     # (D1)
    v1 = rho * v + (1 - rho) * g2 * g2                              # (D2)
    sigma, nu = (v1 + eps).sqrt(), (u + eps).sqrt()                 # (D3)
    d = nu / sigma * g2                                             # (D4)
    u1 = rho * u + (1 - rho) * d * d
    return _Forward(g2, v1, sigma, nu, d, u1, p - lr * d)           # (D5)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, p, v, u, g, *hps)
           for p, v, u, g, *hps
           in zip(params, state.square_avg, state.acc_delta, grads, *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.v1 for f in new], [f.u1 for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adadelta.md, eq. D6–D11)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_v: list[Tensor] = []
    S_u: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, v, u, g, P, V, U) in enumerate(zip(
            params, state.square_avg, state.acc_delta, grads, cot_params,
            cot_state.square_avg, cot_state.acc_delta)):
        lr, rho, eps, wd = (hp[k][i] for k in HYPERS)
        f = _forward(flags, p, v, u, g, lr, rho, eps, wd)
        d_bar = -lr * P + 2 * (1 - rho) * f.d * U                   # (D6)
        nu_bar = d_bar * f.g2 / f.sigma                             # ∂d/∂ν = g₂/σ           (D7)
        sigma_bar = -d_bar * f.d / f.sigma                          # ∂d/∂σ = −d/σ           (D7)
        u_rad_bar = nu_bar / (2 * f.nu)                             # ν = √(u+ε)             (D8)
        v_rad_bar = sigma_bar / (2 * f.sigma)                       # σ = √(v'+ε)            (D8)
        v1_bar = V + v_rad_bar                                      # (D8)
        S_v.append(rho * v1_bar)                                    # S^v_j = ρ v̄'           (D9)
        S_u.append(rho * U + u_rad_bar)                             # S^u_j = ρU + ν̄/(2ν)    (D9)
        g2_bar = d_bar * f.nu / f.sigma + 2 * (1 - rho) * f.g2 * v1_bar  # (D10)
        b_out.append(P + wd * g2_bar)                               # b_j = P + λ ḡ₂         (D10)
        o_out.append(sign * g2_bar)                                 # o_j = s ḡ₂             (D10)
        contrib = {                                                 # (D11)
            "lr": lambda: -P * f.d,
            "rho": lambda: v1_bar * (v - f.g2 * f.g2) + U * (u - f.d * f.d),
            "eps": lambda: u_rad_bar + v_rad_bar,
            "weight_decay": lambda: g2_bar * p,
        }
        for name in need:
            a_out[name].append(reduce_to(contrib[name](), hp[name][i]))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_v, S_u), o_out, a_out)  # type: ignore[arg-type]
