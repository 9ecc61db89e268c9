r"""RAdam (rectified Adam) with decoupled weight decay and maximize.

The update of ``torch.optim.RAdam`` for one tensor at step t (proofs/radam.md,
eq. RA1–RA7):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta \ \text{(coupled)} \quad\text{or}\quad g_2 = s\,g      && (RA1) \\
    \theta_1 &= \theta \ \text{(coupled)} \quad\text{or}\quad \theta_1 = (1-\gamma\lambda)\,\theta && (RA2) \\
    m' &= \beta_1 m + (1-\beta_1)\,g_2, \qquad v' = \beta_2 v + (1-\beta_2)\,g_2^2         && (RA3) \\
    c_1 &= 1-\beta_1^{\,t}, \qquad c_2 = 1-\beta_2^{\,t}                                   && (RA4) \\
    \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad \rho_t = \rho_\infty - \frac{2t\,\beta_2^{\,t}}{c_2} && (RA5) \\
    k &= \begin{cases} R\,\sqrt{c_2}/\delta, \quad
            R = \sqrt{\dfrac{(\rho_t-4)(\rho_t-2)\,\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\,\rho_t}},
            \quad \delta = \sqrt{v'} + \epsilon & \rho_t > 5 \\
         1 & \rho_t \le 5 \end{cases}                                                   && (RA6) \\
    \theta' &= \theta_1 - \gamma\,(m'/c_1)\,k                                               && (RA7)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, β = ``betas``, ε = ``eps``,
λ = ``weight_decay``. Unlike Adam, ε is added to √v' itself, not to √(v'/c₂).

The rectification switch ρ_t > 5 depends on β₂ and t only. θ' jumps there (k
goes from 1 to R√c₂/δ), so it is not differentiable in β₂ at the switch; that
is a single value of β₂ per step (measure zero), and, as autograd does through
``torch.where``, the VJP takes the derivative of the branch that ran
(proofs/radam.md §3). The branch not taken is evaluated at harmless values
(ρ = 6, v' = 1) so that autograd on :func:`step` sees no 0·∞ there either.

Numerical guard (as adam.py, docs/design.md §3): where an element's v' is exactly 0
in a rectified step (a dead unit, moments started at 0, β₂ < 1), m' = 0 too, θ'
does not depend on v' there, and the cotangent of v' through √ is set to its
true value 0 instead of autograd's 0·∞ = NaN (proofs/radam.md §4).
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
    decoupled: bool  # θ₁ = (1 − γλ)θ instead of g₂ = g + λθ


class State(NamedTuple):
    step: list[int]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {
        "lr": group_float(group, "lr"),
        "beta1": group_float(group, "betas", 0),
        "beta2": group_float(group, "betas", 1),
        "eps": group_float(group, "eps"),
        "weight_decay": group_float(group, "weight_decay"),
    }
    flags = Flags(bool(group["maximize"]), bool(group.get("decoupled_weight_decay", False)))
    return flags, hypers


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def moment(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    return State([step_count(torch_state)], [moment("exp_avg")], [moment("exp_avg_sq")])


def write_state(state: State, i: int) -> dict[str, Any]:
    return {"step": step_tensor(state.step[i]),
            "exp_avg": state.exp_avg[i], "exp_avg_sq": state.exp_avg_sq[i]}


class _Forward(NamedTuple):
    """The intermediates of (RA1)–(RA7) for one tensor, shared by step and vjp."""

    g2: Tensor
    m1: Tensor
    v1: Tensor
    c1: Tensor
    c2: Tensor
    on: Tensor          # ρ_t > 5: the rectified branch ran
    rho_t: Tensor       # ρ_t and ρ_∞ where on, 6 elsewhere (the branch not taken)
    rho_inf: Tensor
    R: Tensor           # the rectification term where on, 1 elsewhere
    root: Tensor        # √v' where on, 1 elsewhere
    delta: Tensor
    k: Tensor
    theta: Tensor


def _forward(flags: Flags, t: int, p: Tensor, m: Tensor, v: Tensor, g: Tensor,
             lr: Tensor, b1: Tensor, b2: Tensor, eps: Tensor, wd: Tensor) -> _Forward:
    g = -g if flags.maximize else g
    if flags.decoupled:
        g2, p1 = g, p * (1 - lr * wd)                               # (RA1), (RA2)
    else:
        g2, p1 = g + wd * p, p
    m1 = b1 * m + (1 - b1) * g2                                     # (RA3)
    v1 = b2 * v + (1 - b2) * g2 * g2
    c1, c2 = 1 - b1**t, 1 - b2**t                                   # (RA4)
    rho_inf = 2 / (1 - b2) - 1                                      # (RA5)
    rho_t = rho_inf - 2 * t * b2**t / c2
    on = rho_t > 5                                                  # (RA6), the switch
    rt, ri = torch.where(on, rho_t, 6.0), torch.where(on, rho_inf, 6.0)
    R = ((rt - 4) * (rt - 2) * ri / ((ri - 4) * (ri - 2) * rt)).sqrt()
    root = torch.where(on, v1, 1.0).sqrt()
    delta = root + eps
    k = torch.where(on, R * c2.sqrt() / delta, 1.0)
    return _Forward(g2, m1, v1, c1, c2, on, rt, ri, R, root, delta, k,
                    p1 - lr * (m1 / c1) * k)                        # (RA7)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, t + 1, p, m, v, g, *hps)
           for p, t, m, v, g, *hps in zip(params, *state, grads, *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.m1 for f in new], [f.v1 for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/radam.md, eq. RA8–RA15)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_m: list[Tensor] = []
    S_v: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, t, m, v, g, P, M, V) in enumerate(zip(
            params, *state, grads, cot_params, cot_state.exp_avg, cot_state.exp_avg_sq)):
        lr, b1, b2, eps, wd = (hp[k][i] for k in HYPERS)
        t = t + 1
        f = _forward(flags, t, p, m, v, g, lr, b1, b2, eps, wd)
        on = f.on
        step_size = lr / f.c1
        m1_bar = M - step_size * f.k * P                            # (RA8)
        k_bar = -step_size * f.m1 * P                               # (RA9) ∂θ'/∂k = −γm'/c₁
        c1_bar = step_size * f.m1 * f.k * P / f.c1                  # ∂θ'/∂c₁ = γm'k/c₁²
        # (RA10) rectified branch only: k = R√c₂/δ
        delta_bar = torch.where(on, -k_bar * f.k / f.delta, 0.0)    # ∂k/∂δ = −k/δ
        c2_bar = torch.where(on, k_bar * f.k / (2 * f.c2), 0.0)     # ∂k/∂c₂ = k/(2c₂)
        R_bar = torch.where(on, k_bar * f.c2.sqrt() / f.delta, 0.0)  # ∂k/∂R = √c₂/δ
        # v̄' through δ = √v' + ε: δ̄/(2√v'), set to 0 where v' = 0 (guard, module doc)
        live = on & (f.v1 > 0)
        v1_bar = V + torch.where(live, delta_bar / (2 * torch.where(live, f.root, 1.0)), 0.0)
        # (RA11) ∂ ln R/∂ρ_t and ∂ ln R/∂ρ_∞, then ρ_t = ρ_∞ − h(β₂)
        half_R = R_bar * f.R / 2
        rho_t_bar = half_R * (1 / (f.rho_t - 4) + 1 / (f.rho_t - 2) - 1 / f.rho_t)
        rho_inf_bar = half_R * (1 / f.rho_inf - 1 / (f.rho_inf - 4) - 1 / (f.rho_inf - 2)) \
            + rho_t_bar
        S_m.append(b1 * m1_bar)                                     # (RA12) state adjoint
        S_v.append(b2 * v1_bar)
        g2_bar = (1 - b1) * m1_bar + 2 * (1 - b2) * f.g2 * v1_bar   # (RA13)
        if flags.decoupled:
            b_out.append((1 - lr * wd) * P)                         # (RA14)
        else:
            b_out.append(P + wd * g2_bar)
        o_out.append(sign * g2_bar)                                 # o_j                     (RA14)
        contrib = {                                                 # (RA15)
            "lr": lambda: -(P * f.m1 * f.k / f.c1) - (P * wd * p if flags.decoupled else 0.0),
            "beta1": lambda: m1_bar * (m - f.g2) - c1_bar * t * b1 ** (t - 1),
            "beta2": lambda: v1_bar * (v - f.g2 * f.g2) - c2_bar * t * b2 ** (t - 1)
            + rho_inf_bar * 2 / (1 - b2) ** 2 - rho_t_bar * 2 * t * t * b2 ** (t - 1) / f.c2 ** 2,
            "eps": lambda: delta_bar,
            "weight_decay": lambda: (-P * lr * p) if flags.decoupled else g2_bar * p,
        }
        for name in need:
            a_out[name].append(reduce_to(contrib[name](), hp[name][i]))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_m, S_v), o_out, a_out)  # type: ignore[arg-type]
