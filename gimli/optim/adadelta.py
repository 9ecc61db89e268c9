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

from . import _pieces as pc
from ._core import NONNEGATIVE, VJP, Interval, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "rho", "eps", "weight_decay")


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: int
    square_avg: Tensor
    acc_delta: Tensor


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    return Flags(bool(group["maximize"])), {name: group_float(group, name) for name in HYPERS}


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def avg(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    return State(step_count(torch_state), avg("square_avg"), avg("acc_delta"))


class _Forward(NamedTuple):
    """The intermediates of (D1)–(D5), shared by step and vjp."""

    g2: Tensor
    v1: Tensor
    sigma: Tensor
    nu: Tensor
    d: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor],
             after: State | None = None) -> _Forward:
    """(D1)–(D4), what step and vjp both read; with ``after`` (the State :func:`step`
    produced), v' is read from it."""
    lr, rho, eps, wd = (hp[k] for k in HYPERS)
    g2 = pc.coupled_decay(g, p, wd, flags.maximize)                 # (D1)
    v1 = after.square_avg if after is not None else pc.ema(s.square_avg, g2 * g2, rho)   # (D2)
    sigma, nu = (v1 + eps).sqrt(), (s.acc_delta + eps).sqrt()       # (D3)
    d = nu / sigma * g2                                             # (D4)
    return _Forward(g2, v1, sigma, nu, d)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    u1 = pc.ema(s.acc_delta, f.d * f.d, hp["rho"])                 # (D4): the VJP needs not u'
    return p - hp["lr"] * f.d, State(s.step + 1, f.v1, u1)         # (D5)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adadelta.md, eq. D6–D11)."""
    f = _forward(flags, p, s, g, hp, after)         # (after=: v' as step stored it)
    lr, rho, eps, wd = (hp[k] for k in HYPERS)
    d_bar = -lr * P                                                 # (D6)
    S_u: Tensor | int = 0                                           # ρU, the direct part of S^u_j
    rho_bar: Tensor | int = 0
    U = S.acc_delta
    if U is not None:
        S_u, dd_bar, rho_bar = pc.ema_vjp(U, s.acc_delta, f.d * f.d, rho)
        d_bar = d_bar + 2 * f.d * dd_bar                            # (D6)
    nu_bar = d_bar * f.g2 / f.sigma                                 # ∂d/∂ν = g₂/σ           (D7)
    sigma_bar = -d_bar * f.d / f.sigma                              # ∂d/∂σ = −d/σ           (D7)
    u_rad_bar = nu_bar / (2 * f.nu)                                 # ν = √(u+ε)             (D8)
    v_rad_bar = sigma_bar / (2 * f.sigma)                           # σ = √(v'+ε)            (D8)
    v1_bar = v_rad_bar if S.square_avg is None else S.square_avg + v_rad_bar   # (D8)
    S_v, sq_bar, v_rho_bar = pc.ema_vjp(v1_bar, s.square_avg, f.g2 * f.g2, rho)  # S^v_j = ρ v̄' (D9)
    g2_bar = d_bar * f.nu / f.sigma + 2 * f.g2 * sq_bar             # (D10)
    b_out, o_out, wd_bar = pc.coupled_decay_vjp(P, g2_bar, p, wd, flags.maximize, need)   # (D10)
    contrib = {                                                     # (D11)
        "lr": lambda: -P * f.d,
        "rho": lambda: v_rho_bar + rho_bar,
        "eps": lambda: u_rad_bar + v_rad_bar,
        "weight_decay": lambda: wd_bar,
    }
    return VJP(b_out, State(0, S_v, S_u + u_rad_bar),       # S^u_j = ρU + ν̄/(2ν)    (D9)
               o_out, {name: contrib[name]() for name in need})


RULE = Rule(
    hypers=HYPERS,
    # as torch.optim.Adadelta's constructor checks them: 0 ≤ ρ ≤ 1, the rest ≥ 0
    ranges={"lr": NONNEGATIVE, "rho": Interval(0.0, 1.0), "eps": NONNEGATIVE,
            "weight_decay": NONNEGATIVE},
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    reads_after=True,
)
