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

Numerical guard (docs/design.md §3): where an element's u is exactly 0 and the moments
started at 0 with β₂ < 1, every past g₂ of that element was 0, so m' = 0 too and θ'
does not depend on u there: the cotangent of u is set to its true value 0 instead
of autograd's 0·∞ = NaN (proofs/adam.md §4). Where u = 0 but m' ≠ 0 (β₂ = 0, or a
loaded state with v = 0 and m ≠ 0) θ' is not differentiable in u; the guard's 0 is
then a convention.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from ._core import (BETA, NONNEGATIVE, VJP, Hypers, group_float, step_count, step_tensor,
                   )
from ._lists import Tensors

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")
GROUP_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}  # where param_groups keep them
# as torch.optim's constructor checks them: 0 ≤ β < 1, the rest ≥ 0
RANGES = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
          "weight_decay": NONNEGATIVE}


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
    out: dict[str, Any] = {"step": step_tensor(state.step[i]),
                           "exp_avg": state.exp_avg[i], "exp_avg_sq": state.exp_avg_sq[i]}
    if state.max_exp_avg_sq[i] is not None:
        out["max_exp_avg_sq"] = state.max_exp_avg_sq[i]
    return out


class _Forward(NamedTuple):
    """The intermediates of (A1)–(A6) over a group's tensors, shared by step and vjp."""

    g2: Tensors
    p1: Tensors         # θ₁
    m1: Tensors
    v1: Tensors
    u: Tensors
    c1: Tensors         # per tensor, the hyperparameters' shape
    c2: Tensors
    r: Tensors
    delta: Tensors


def _forward(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
             hp: Hypers) -> _Forward:
    p, m, v, g = Tensors(params), Tensors(state.exp_avg), Tensors(state.exp_avg_sq), Tensors(grads)
    lr, b1, b2, eps, wd = (Tensors(hp[k]) for k in HYPERS)
    if flags.maximize:
        g = -g
    if flags.decoupled:
        g2, p1 = g, p * (1 - lr * wd)                               # (A1), (A2)
    else:
        g2, p1 = g + wd * p, p
    m1 = b1 * m + (1 - b1) * g2                                     # (A3)
    v1 = b2 * v + (1 - b2) * g2 * g2
    if flags.amsgrad:                                               # (A4)
        u = Tensors(cast(list[Tensor], state.max_exp_avg_sq)).maximum(v1)
    else:
        u = v1
    t = [float(n + 1) for n in state.step]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t                               # (A5)
    r = u.sqrt() / c2.sqrt()                                        # (A6)
    return _Forward(g2, p1, m1, v1, u, c1, c2, r, r + eps)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    f = _forward(flags, params, state, grads, hp)
    theta = f.p1 - (Tensors(hp["lr"]) / f.c1) * f.m1 / f.delta      # (A7)
    vmax: list[Tensor | None] = list(f.u) if flags.amsgrad else [None] * len(params)
    return theta.ts, State([t + 1 for t in state.step], f.m1.ts, f.v1.ts, vmax)


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adam.md, eq. A8–A15)."""
    f = _forward(flags, params, state, grads, hp)
    p, P, M, V = Tensors(params), Tensors(cot_params), Tensors(cot_state.exp_avg), \
        Tensors(cot_state.exp_avg_sq)
    lr, b1, b2, eps, wd = (Tensors(hp[k]) for k in HYPERS)
    step_size = lr / f.c1
    update = f.m1 / f.delta                                         # θ' = θ₁ − (γ/c₁)·update
    P_delta = P / f.delta
    m1_bar = M - step_size * P_delta                                # (A8)
    delta_bar = step_size * P_delta * update                        # ∂θ'/∂δ = (γ/c₁) m'/δ²  (A9)
    # (A10) r = √u/√c₂: ū = r̄/(2 c₂ r), set to 0 where u = 0 (guard, module doc)
    u_bar = delta_bar.map(lambda d, r, c2: torch.where(r > 0, d / (2 * c2 * torch.where(r > 0, r, 1.0)),
                                                       0.0), f.r, f.c2)
    S_vmax: list[Tensor | None] = [None] * len(params)
    if flags.amsgrad:                                               # (A11) u = max(v̂, v')
        vmax = Tensors(cast(list[Tensor], state.max_exp_avg_sq))
        X_total = Tensors(cast(list[Tensor], cot_state.max_exp_avg_sq)) + u_bar
        to_v = f.v1.map(lambda v1, vm: (v1 > vm).to(v1.dtype) + 0.5 * (v1 == vm).to(v1.dtype), vmax)
        v1_bar = V + to_v * X_total
        S_vmax = list((1 - to_v) * X_total)
    else:
        v1_bar = V + u_bar
    g2_bar = (1 - b1) * m1_bar + 2 * (1 - b2) * f.g2 * v1_bar       # (A13)
    if flags.decoupled:                                             # (A14)
        b_out = (1 - lr * wd) * P
    else:
        b_out = P + wd * g2_bar
    o_out = -g2_bar if flags.maximize else g2_bar                   # o_j                     (A14)
    t = [float(n + 1) for n in state.step]
    contrib = {                                                     # (A15)
        "lr": lambda: -(P * update / f.c1) - P * wd * p if flags.decoupled else -(P * update / f.c1),
        # ∂θ'/∂c₁ = (γ/c₁²) m'/δ and ∂c₁/∂β₁ = −t β₁^(t−1)
        "beta1": lambda: m1_bar * (Tensors(state.exp_avg) - f.g2)
        - step_size * P * update / f.c1 * t * b1 ** [n - 1 for n in t],
        # ∂r/∂c₂ = −r/(2c₂) and ∂c₂/∂β₂ = −t β₂^(t−1)
        "beta2": lambda: v1_bar * (Tensors(state.exp_avg_sq) - f.g2 * f.g2)
        + delta_bar * f.r / (2 * f.c2) * t * b2 ** [n - 1 for n in t],
        "eps": lambda: delta_bar,
        "weight_decay": lambda: -P * lr * p if flags.decoupled else g2_bar * p,
    }
    a_out: Hypers = {name: contrib[name]().sum_to(hp[name]) for name in need}
    steps_bar = cast(list[int], [None] * len(params))           # step counts have no cotangent
    return VJP(b_out.ts, State(steps_bar, (b1 * m1_bar).ts, (b2 * v1_bar).ts, S_vmax),  # (A12)
               o_out.ts, a_out)
