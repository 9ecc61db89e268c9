r"""Adam, AdamW (decoupled weight decay) and AMSGrad, with maximize.

The update of ``torch.optim.Adam``/``AdamW`` for one tensor at step t
(proofs/adam.md, eq. A1–A7):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta \ \text{(coupled)} \quad\text{or}\quad g_2 = s\,g      && (A1) \\
    \theta_1 &= \theta \ \text{(coupled)} \quad\text{or}\quad \theta_1 = (1-\gamma\lambda)\,\theta && (A2) \\
    m' &= \beta_1 m + (1-\beta_1)\,g_2, \qquad v' = \beta_2 v + (1-\beta_2)\,g_2^2         && (A3) \\
    u  &= \max(\hat v, v') \ \text{(amsgrad, and } \hat v' = u) \quad\text{or}\quad u = v'  && (A4) \\
    c_1 &= 1-\beta_1^{\,t}, \qquad c_2 = 1-\beta_2^{\,t}                                   && (A5) \\
    r &= \sqrt{u}\,/\sqrt{c_2}, \qquad \delta = r + \epsilon                                && (A6) \\
    \theta' &= \theta_1 - (\gamma / c_1)\; m' / \delta                                     && (A7)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, β = ``betas``, ε = ``eps``,
λ = ``weight_decay``. AdamW is this file with ``decoupled=True``.

Numerical guard (DESIGN.md §3): where an element's u is exactly 0 and the moments
started at 0 with β₂ < 1, every past g₂ of that element was 0, so m' = 0 too and θ'
does not depend on u there: the cotangent of u is set to its true value 0 instead
of autograd's 0·∞ = NaN (proofs/adam.md §4). Where u = 0 but m' ≠ 0 (β₂ = 0, or a
loaded state with v = 0 and m ≠ 0) θ' is not differentiable in u; the guard's 0 is
then a convention.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._core import VJP, Hypers, group_float, reduce_to, step_count

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")
GROUP_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}  # where param_groups keep them


class Flags(NamedTuple):
    amsgrad: bool
    maximize: bool
    decoupled: bool  # AdamW: θ₁ = (1 − γλ)θ instead of g₂ = g + λθ


class State(NamedTuple):
    step: list[int]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    max_exp_avg_sq: list[Tensor | None]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {
        "lr": group_float(group, "lr"),
        "beta1": group_float(group, "betas", 0),
        "beta2": group_float(group, "betas", 1),
        "eps": group_float(group, "eps"),
        "weight_decay": group_float(group, "weight_decay"),
    }
    flags = Flags(bool(group["amsgrad"]), bool(group["maximize"]),
                  bool(group.get("decoupled_weight_decay", False)))
    return flags, hypers


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def moment(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    return State([step_count(torch_state)], [moment("exp_avg")], [moment("exp_avg_sq")],
                 [moment("max_exp_avg_sq") if group["amsgrad"] else None])


def write_state(state: State, i: int) -> dict[str, Any]:
    out: dict[str, Any] = {"step": torch.tensor(float(state.step[i])),
                           "exp_avg": state.exp_avg[i], "exp_avg_sq": state.exp_avg_sq[i]}
    if state.max_exp_avg_sq[i] is not None:
        out["max_exp_avg_sq"] = state.max_exp_avg_sq[i]
    return out


class _Forward(NamedTuple):
    """The intermediates of (A1)–(A7) for one tensor, shared by step and vjp."""

    g2: Tensor
    m1: Tensor
    v1: Tensor
    u: Tensor
    c1: Tensor
    c2: Tensor
    r: Tensor
    delta: Tensor
    theta: Tensor


def _forward(flags: Flags, t: int, p: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None,
             g: Tensor, lr: Tensor, b1: Tensor, b2: Tensor, eps: Tensor, wd: Tensor) -> _Forward:
    g = -g if flags.maximize else g
    if flags.decoupled:
        g2, p1 = g, p * (1 - lr * wd)                               # (A1), (A2)
    else:
        g2, p1 = g + wd * p, p
    m1 = b1 * m + (1 - b1) * g2                                     # (A3)
    v1 = b2 * v + (1 - b2) * g2 * g2
    u = torch.maximum(vmax, v1) if vmax is not None else v1         # (A4)
    c1, c2 = 1 - b1**t, 1 - b2**t                                   # (A5)
    r = u.sqrt() / c2.sqrt()                                        # (A6)
    delta = r + eps
    return _Forward(g2, m1, v1, u, c1, c2, r, delta, p1 - (lr / c1) * m1 / delta)   # (A7)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, t + 1, p, m, v, vmax, g, lr, b1, b2, eps, wd)
           for p, t, m, v, vmax, g, lr, b1, b2, eps, wd
           in zip(params, *state, grads, *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.m1 for f in new], [f.v1 for f in new],
        [f.u if flags.amsgrad else None for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adam.md, eq. A8–A15)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_m: list[Tensor] = []
    S_v: list[Tensor] = []
    S_vmax: list[Tensor | None] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, t, m, v, vmax, g, P, M, V, X) in enumerate(zip(
            params, *state, grads, cot_params, cot_state.exp_avg, cot_state.exp_avg_sq,
            cot_state.max_exp_avg_sq)):
        lr, b1, b2, eps, wd = (hp[k][i] for k in HYPERS)
        t = t + 1
        f = _forward(flags, t, p, m, v, vmax, g, lr, b1, b2, eps, wd)
        step_size = lr / f.c1
        update = f.m1 / f.delta                                     # θ' = θ₁ − (γ/c₁)·update
        m1_bar = M - step_size * P / f.delta                        # (A8)
        delta_bar = step_size * P * update / f.delta                # ∂θ'/∂δ = (γ/c₁) m'/δ²  (A9)
        # (A10) r = √u/√c₂: ū = r̄/(2 c₂ r), set to 0 where u = 0 (guard, module doc)
        r_pos = f.r > 0
        u_bar = torch.where(r_pos, delta_bar / (2 * f.c2 * torch.where(r_pos, f.r, 1.0)), 0.0)
        c2_bar = -delta_bar * f.r / (2 * f.c2)                      # ∂r/∂c₂ = −r/(2c₂)
        c1_bar = step_size * P * update / f.c1                      # ∂θ'/∂c₁ = (γ/c₁²) m'/δ
        if vmax is not None:                                        # (A11) u = max(v̂, v')
            X_total = X + u_bar
            to_v = (f.v1 > vmax).to(p.dtype) + 0.5 * (f.v1 == vmax).to(p.dtype)
            v1_bar = V + to_v * X_total
            S_vmax.append((1 - to_v) * X_total)
        else:
            v1_bar = V + u_bar
            S_vmax.append(None)
        S_m.append(b1 * m1_bar)                                     # (A12) state adjoint
        S_v.append(b2 * v1_bar)
        g2_bar = (1 - b1) * m1_bar + 2 * (1 - b2) * f.g2 * v1_bar   # (A13)
        if flags.decoupled:
            b_out.append((1 - lr * wd) * P)                         # (A14)
        else:
            b_out.append(P + wd * g2_bar)
        o_out.append(sign * g2_bar)                                 # o_j                     (A14)
        contrib = {                                                 # (A15)
            "lr": lambda: -(P * update / f.c1) - (P * wd * p if flags.decoupled else 0.0),
            "beta1": lambda: m1_bar * (m - f.g2) - c1_bar * t * b1 ** (t - 1),
            "beta2": lambda: v1_bar * (v - f.g2 * f.g2) - c2_bar * t * b2 ** (t - 1),
            "eps": lambda: delta_bar,
            "weight_decay": lambda: (-P * lr * p) if flags.decoupled else g2_bar * p,
        }
        for name in need:
            a_out[name].append(reduce_to(contrib[name](), hp[name][i]))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_m, S_v, S_vmax), o_out, a_out)  # type: ignore[arg-type]
