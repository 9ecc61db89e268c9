r"""NAdam (Nesterov-accelerated Adam) with momentum decay, decoupled weight decay and maximize.

The update of ``torch.optim.NAdam`` for one tensor at step t (proofs/nadam.md,
eq. N1–N7):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta \ \text{(coupled)} \quad\text{or}\quad g_2 = s\,g      && (N1) \\
    \theta_1 &= \theta \ \text{(coupled)} \quad\text{or}\quad \theta_1 = (1-\gamma\lambda)\,\theta && (N2) \\
    \mu_t &= \beta_1\,(1 - \tfrac12\,0.96^{\,t\psi}), \qquad
        \mu_{t+1} = \beta_1\,(1 - \tfrac12\,0.96^{\,(t+1)\psi})                          && (N3) \\
    \Pi' &= \Pi\,\mu_t, \qquad \Pi'' = \Pi'\,\mu_{t+1}                                   && (N4) \\
    m' &= \beta_1 m + (1-\beta_1)\,g_2, \qquad v' = \beta_2 v + (1-\beta_2)\,g_2^2         && (N5) \\
    c_2 &= 1-\beta_2^{\,t}, \qquad r = \sqrt{v'/c_2}, \qquad \delta = r + \epsilon          && (N6) \\
    \theta' &= \theta_1 - \alpha\,g_2/\delta - \kappa\,m'/\delta, \qquad
        \alpha = \frac{\gamma(1-\mu_t)}{1-\Pi'}, \quad \kappa = \frac{\gamma\,\mu_{t+1}}{1-\Pi''} && (N7)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, β = ``betas``, ε = ``eps``,
λ = ``weight_decay``, ψ = ``momentum_decay``. Π is the state ``mu_product``
(1 before the first step): a running product of the μ_t, so a function of β₁, ψ
and the steps, with its own state adjoint.

Rounding of Π: ``torch.optim`` keeps ``mu_product`` in
its scalar dtype (float32 unless the default dtype is float64) and multiplies it
there, Π' = fl(Π·fl(μ_t)); Π'' and everything after is computed in double. The
step reproduces that value (``Flags.mu_dtype``) and differentiates the exact
product Π·μ_t: the rounding residual is a constant (``.detach()`` in
:func:`_forward`). Rounding is piecewise constant, its own derivative 0 a.e. and
of no use; the identity is the derivative of the arithmetic torch means to do
(proofs/nadam.md §3).

Numerical guard (as adam.py, docs/design.md §3): where an element's v' is exactly 0
(a dead unit, moments started at 0, β₂ < 1), g₂ = 0 and m' = 0, θ' does not
depend on v' there, and the cotangent of v' through √ is set to its true value 0
instead of autograd's 0·∞ = NaN (proofs/nadam.md §4).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._core import (BETA, NONNEGATIVE, VJP, Hypers, group_float, hyper_dtype, reduce_to,
                    scalar_dtype, step_count, step_tensor)

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay")
GROUP_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}  # where param_groups keep them
# as torch.optim's constructor checks them: 0 ≤ β < 1, the rest ≥ 0
RANGES = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
          "weight_decay": NONNEGATIVE, "momentum_decay": NONNEGATIVE}
# μ_t (so Π) is per element where β₁ or ψ is, but torch.optim keeps Π as one number per tensor
SCALAR_STATE = {"beta1": "mu_product", "momentum_decay": "mu_product"}
_LN_096 = math.log(0.96)


class Flags(NamedTuple):
    maximize: bool
    decoupled: bool         # θ₁ = (1 − γλ)θ instead of g₂ = g + λθ
    mu_dtype: torch.dtype   # the dtype torch keeps mu_product in (its scalar dtype)


class State(NamedTuple):
    step: list[int]
    mu_product: list[Tensor]    # Π, 0-dim, or shaped like β₁/ψ where those are per element
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {
        "lr": group_float(group, "lr"),
        "beta1": group_float(group, "betas", 0),
        "beta2": group_float(group, "betas", 1),
        "eps": group_float(group, "eps"),
        "weight_decay": group_float(group, "weight_decay"),
        "momentum_decay": group_float(group, "momentum_decay"),
    }
    flags = Flags(bool(group["maximize"]), bool(group.get("decoupled_weight_decay", False)),
                  scalar_dtype())
    return flags, hypers


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def moment(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    # torch creates Π as 1.0 in its scalar dtype; here in the hyperparameters' dtype (the
    # parameter's, at least float32: a bfloat16 Π would lose the product in a few steps)
    prod = torch_state.get("mu_product")
    kw: dict[str, Any] = {"dtype": hyper_dtype(param.dtype), "device": param.device}
    prod = torch.ones((), **kw) if prod is None else prod.detach().to(**kw, copy=True)
    return State([step_count(torch_state)], [prod], [moment("exp_avg")], [moment("exp_avg_sq")])


def write_state(state: State, i: int) -> dict[str, Any]:
    return {"step": step_tensor(state.step[i]),
            "mu_product": state.mu_product[i].to(scalar_dtype()),      # torch's dtype for it
            "exp_avg": state.exp_avg[i], "exp_avg_sq": state.exp_avg_sq[i]}


class _Forward(NamedTuple):
    """The intermediates of (N1)–(N7) for one tensor, shared by step and vjp."""

    g2: Tensor
    e: Tensor           # 0.96^{tψ}
    e_next: Tensor      # 0.96^{(t+1)ψ}
    mu: Tensor
    mu_next: Tensor
    prod: Tensor        # Π'
    prod_next: Tensor   # Π''
    m1: Tensor
    v1: Tensor
    c2: Tensor
    r: Tensor
    delta: Tensor
    alpha: Tensor
    kappa: Tensor
    theta: Tensor


def _forward(flags: Flags, t: int, p: Tensor, prod: Tensor, m: Tensor, v: Tensor, g: Tensor,
             lr: Tensor, b1: Tensor, b2: Tensor, eps: Tensor, wd: Tensor, psi: Tensor) -> _Forward:
    g = -g if flags.maximize else g
    if flags.decoupled:
        g2, p1 = g, p * (1 - lr * wd)                               # (N1), (N2)
    else:
        g2, p1 = g + wd * p, p
    e, e_next = 0.96 ** (t * psi), 0.96 ** ((t + 1) * psi)         # (N3)
    mu, mu_next = b1 * (1 - 0.5 * e), b1 * (1 - 0.5 * e_next)
    prod1 = prod * mu                                               # (N4)
    if torch.finfo(flags.mu_dtype).eps > torch.finfo(prod1.dtype).eps:
        # torch's value fl(Π·fl(μ_t)) in its scalar dtype; derivative of the exact product
        kept = (prod.detach().to(flags.mu_dtype) * mu.detach().to(flags.mu_dtype)).to(prod1.dtype)
        prod1 = prod1 + (kept - prod1.detach())
    prod2 = prod1 * mu_next
    m1 = b1 * m + (1 - b1) * g2                                     # (N5)
    v1 = b2 * v + (1 - b2) * g2 * g2
    c2 = 1 - b2**t                                                  # (N6)
    r = (v1 / c2).sqrt()
    delta = r + eps
    alpha = lr * (1 - mu) / (1 - prod1)                             # (N7)
    kappa = lr * mu_next / (1 - prod2)
    theta = p1 - alpha * g2 / delta - kappa * m1 / delta
    return _Forward(g2, e, e_next, mu, mu_next, prod1, prod2, m1, v1, c2, r, delta, alpha, kappa,
                    theta)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, t + 1, p, prod, m, v, g, *hps)
           for p, t, prod, m, v, g, *hps
           in zip(params, *state, grads, *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.prod for f in new], [f.m1 for f in new],
        [f.v1 for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/nadam.md, eq. N8–N16)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_prod: list[Tensor] = []
    S_m: list[Tensor] = []
    S_v: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, t, prod, m, v, g, P, Q, M, V) in enumerate(zip(
            params, *state, grads, cot_params, cot_state.mu_product, cot_state.exp_avg,
            cot_state.exp_avg_sq)):
        lr, b1, b2, eps, wd, psi = (hp[k][i] for k in HYPERS)
        t = t + 1
        f = _forward(flags, t, p, prod, m, v, g, lr, b1, b2, eps, wd, psi)
        qg, qm = f.g2 / f.delta, f.m1 / f.delta                     # θ' = θ₁ − α q_g − κ q_m
        m1_bar = M - f.kappa * P / f.delta                          # (N8)
        delta_bar = P * (f.alpha * qg + f.kappa * qm) / f.delta     # ∂θ'/∂δ = (αg₂ + κm')/δ²  (N9)
        # (N10) r = √(v'/c₂): v̄' = r̄/(2 c₂ r), set to 0 where v' = 0 (guard, module doc)
        r_pos = f.r > 0
        v1_bar = V + torch.where(r_pos, delta_bar / (2 * f.c2 * torch.where(r_pos, f.r, 1.0)), 0.0)
        c2_bar = -delta_bar * f.r / (2 * f.c2)                      # ∂r/∂c₂ = −r/(2c₂)
        # (N11) α, κ and all of N3–N4 may be smaller than θ (0-dim hyperparameters and Π):
        # each elementwise term is summed to its quantity's shape before it is combined
        alpha_bar = reduce_to(-P * qg, f.alpha)
        kappa_bar = reduce_to(-P * qm, f.kappa)
        one_p1, one_p2 = 1 - f.prod, 1 - f.prod_next
        prod2_bar = reduce_to(kappa_bar * f.kappa / one_p2, f.prod_next)   # (N12) ∂κ/∂Π'' = κ/(1−Π'')
        prod1_bar = Q + reduce_to(alpha_bar * f.alpha / one_p1, f.prod) + prod2_bar * f.mu_next
        mu_bar = (reduce_to(-alpha_bar * lr / one_p1, f.mu)               # (N13) μ̄_t
                  + reduce_to(prod1_bar * prod, f.mu))
        mu_next_bar = (reduce_to(kappa_bar * lr / one_p2, f.mu_next)     # μ̄_{t+1}
                       + reduce_to(prod2_bar * f.prod, f.mu_next))
        S_prod.append(reduce_to(prod1_bar * f.mu, prod))            # (N14) state adjoint
        S_m.append(b1 * m1_bar)
        S_v.append(b2 * v1_bar)
        g2_bar = -f.alpha * P / f.delta + (1 - b1) * m1_bar + 2 * (1 - b2) * f.g2 * v1_bar  # (N15)
        if flags.decoupled:
            b_out.append((1 - lr * wd) * P)                         # (N15) b_j
        else:
            b_out.append(P + wd * g2_bar)
        o_out.append(sign * g2_bar)                                 # o_j                     (N15)
        contrib = {                                                 # (N16)
            "lr": lambda: [alpha_bar * (1 - f.mu) / one_p1, kappa_bar * f.mu_next / one_p2]
            + ([-P * wd * p] if flags.decoupled else []),
            "beta1": lambda: [m1_bar * (m - f.g2),
                              mu_bar * (1 - 0.5 * f.e) + mu_next_bar * (1 - 0.5 * f.e_next)],
            "beta2": lambda: [v1_bar * (v - f.g2 * f.g2) - c2_bar * t * b2 ** (t - 1)],
            "eps": lambda: [delta_bar],
            "weight_decay": lambda: [(-P * lr * p) if flags.decoupled else g2_bar * p],
            "momentum_decay": lambda: [-0.5 * b1 * _LN_096 * (mu_bar * t * f.e
                                                              + mu_next_bar * (t + 1) * f.e_next)],
        }
        for name in need:
            like = hp[name][i]                                      # terms of different shapes
            a_out[name].append(sum((reduce_to(x, like) for x in contrib[name]()),
                                   torch.zeros_like(like)))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_prod, S_m, S_v), o_out, a_out)  # type: ignore[arg-type]
