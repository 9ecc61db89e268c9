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

from . import _pieces as pc
from ._core import (ADAM_RANGES, BETAS_KEYS, NONNEGATIVE, VJP, group_float, hyper_dtype, scalar_dtype,
                    step_count, step_tensor)
from ._rule import Rule

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay")
_LN_096 = math.log(0.96)


class Flags(NamedTuple):
    maximize: bool
    decoupled: bool         # θ₁ = (1 − γλ)θ instead of g₂ = g + λθ
    mu_dtype: torch.dtype   # the dtype torch keeps mu_product in (its scalar dtype)


class State(NamedTuple):
    step: int
    mu_product: Tensor      # Π, 0-dim, or per element where β₁ or ψ is (or spread over a call)
    exp_avg: Tensor
    exp_avg_sq: Tensor


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
    return State(step_count(torch_state), prod, moment("exp_avg"), moment("exp_avg_sq"))


def write_state(state: State) -> dict[str, Any]:
    return {"step": step_tensor(state.step),
            "mu_product": state.mu_product.to(scalar_dtype()),     # torch's dtype for it
            "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}


class _Forward(NamedTuple):
    """The intermediates of (N1)–(N7), shared by step and vjp."""

    t: int
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
    p1: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor],
             after: State | None = None) -> _Forward:
    """(N1)–(N7); with ``after`` (the State :func:`step` produced), m' and v' are read from it;
    with ``e``, ``e_next`` and ``c2`` among ``hp`` (a compiled call: :func:`scalars`), those."""
    lr, b1, b2, eps, wd, psi = (hp[k] for k in HYPERS)
    t = s.step + 1
    g2, p1 = pc.weight_decay(g, p, lr, wd, flags.maximize, flags.decoupled)   # (N1), (N2)
    c = hp if "c2" in hp else scalars(s, hp)                        # (N3), (N6)
    e, e_next, c2 = c["e"], c["e_next"], c["c2"]
    mu, mu_next = b1 * (1 - 0.5 * e), b1 * (1 - 0.5 * e_next)
    prod1 = s.mu_product * mu                                       # (N4)
    if torch.finfo(flags.mu_dtype).eps > torch.finfo(prod1.dtype).eps:
        # torch's value fl(Π·fl(μ_t)) in its scalar dtype; derivative of the exact product
        kept = (s.mu_product.detach().to(flags.mu_dtype) * mu.detach().to(flags.mu_dtype)).to(prod1.dtype)
        prod1 = prod1 + (kept - prod1.detach())
    prod2 = prod1 * mu_next
    if after is not None:                                           # (N5), as step stored them
        m1, v1 = after.exp_avg, after.exp_avg_sq
    else:
        m1 = pc.ema(s.exp_avg, g2, b1)                              # (N5)
        v1 = pc.ema(s.exp_avg_sq, g2 * g2, b2)
    r = (v1 / c2).sqrt()
    delta = r + eps
    alpha = lr * (1 - mu) / (1 - prod1)                             # (N7)
    kappa = lr * mu_next / (1 - prod2)
    return _Forward(t, g2, e, e_next, mu, mu_next, prod1, prod2, m1, v1, c2, r, delta, alpha,
                    kappa, p1)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    theta = f.p1 - f.alpha * f.g2 / f.delta - f.kappa * f.m1 / f.delta
    return theta, State(f.t, f.prod, f.m1, f.v1)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/nadam.md, eq. N8–N16).

    Every term is returned per element: α, κ, μ_τ, Π' and Π'' may be one number for the
    tensor (0-dim hyperparameters and Π), and the engine sums each per-element cotangent
    to that shape; every term is linear in one of P, Q, M, V, so summing once at the end
    equals summing each term to its quantity's shape on the way."""
    lr, b1, b2, eps, wd, psi = (hp[k] for k in HYPERS)
    f = _forward(flags, p, s, g, hp, after)         # (after=: m', v' as step stored them)
    t = f.t
    qg, qm = f.g2 / f.delta, f.m1 / f.delta                         # θ' = θ₁ − α q_g − κ q_m
    kappa_P = f.kappa * P / f.delta
    m1_bar = -kappa_P if S.exp_avg is None else S.exp_avg - kappa_P                    # (N8)
    delta_bar = P * (f.alpha * qg + f.kappa * qm) / f.delta     # ∂θ'/∂δ = (αg₂ + κm')/δ²  (N9)
    # (N10) r = √(v'/c₂): v̄' = r̄/(2 c₂ r), set to 0 where v' = 0 (guard, module doc)
    v1_from_r = pc.sqrt_vjp(delta_bar, f.r, f.c2)
    v1_bar = v1_from_r if S.exp_avg_sq is None else S.exp_avg_sq + v1_from_r
    c2_bar = -delta_bar * f.r / (2 * f.c2)                          # ∂r/∂c₂ = −r/(2c₂)
    alpha_bar, kappa_bar = -P * qg, -P * qm                         # (N11)
    one_p1, one_p2 = 1 - f.prod, 1 - f.prod_next
    prod2_bar = kappa_bar * f.kappa / one_p2                        # (N12) ∂κ/∂Π'' = κ/(1−Π'')
    prod1_bar = alpha_bar * f.alpha / one_p1 + prod2_bar * f.mu_next
    if S.mu_product is not None:
        prod1_bar = prod1_bar + S.mu_product
    mu_bar = -alpha_bar * lr / one_p1 + prod1_bar * s.mu_product   # (N13) μ̄_t
    mu_next_bar = kappa_bar * lr / one_p2 + prod2_bar * f.prod      # μ̄_{t+1}
    g2_bar = -f.alpha * P / f.delta + (1 - b1) * m1_bar + 2 * (1 - b2) * f.g2 * v1_bar  # (N15)
    b_out, o_out, lr_decay_bar, wd_bar = pc.weight_decay_vjp(P, g2_bar, p, lr, wd, flags.maximize,
                                                             flags.decoupled, need)   # (N15) b_j, o_j
    contrib = {                                                     # (N16)
        "lr": lambda: pc.plus(alpha_bar * (1 - f.mu) / one_p1 + kappa_bar * f.mu_next / one_p2,
                              lr_decay_bar),
        "beta1": lambda: m1_bar * (s.exp_avg - f.g2)
        + mu_bar * (1 - 0.5 * f.e) + mu_next_bar * (1 - 0.5 * f.e_next),
        "beta2": lambda: v1_bar * (s.exp_avg_sq - f.g2 * f.g2)
        + c2_bar * pc.bias_correction_grad(b2, t),
        "eps": lambda: delta_bar,
        "weight_decay": lambda: wd_bar,
        "momentum_decay": lambda: -0.5 * b1 * _LN_096 * (mu_bar * t * f.e
                                                         + mu_next_bar * (t + 1) * f.e_next),
    }
    return VJP(b_out, State(0, f.mu * prod1_bar, b1 * m1_bar, b2 * v1_bar),   # (N14) state adjoint
               o_out, {name: contrib[name]() for name in need})


def scalars(s: State, hp: dict[str, Tensor]) -> dict[str, Tensor]:
    """The numbers of this step that depend on the step count t: 0.96^(tψ) and 0.96^((t+1)ψ)
    (N3) and c₂ = 1 − β₂^t (N6); formed before a compiled call (``Rule.scalars``), else by
    :func:`_forward` itself."""
    t, psi = s.step + 1, hp["momentum_decay"]
    return {"e": 0.96 ** (t * psi), "e_next": 0.96 ** ((t + 1) * psi),
            "c2": pc.bias_correction(hp["beta2"], t)}


RULE = Rule(
    hypers=HYPERS,
    ranges={**ADAM_RANGES, "momentum_decay": NONNEGATIVE},
    read_group=read_group, read_state=read_state, step=step, vjp=vjp, write_state=write_state,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    reads_after=True, scalars=scalars,
    group_keys=BETAS_KEYS,
    # μ_t (so Π) is per element where β₁ or ψ is, but torch.optim keeps Π as one number per tensor
    scalar_state={"beta1": "mu_product", "momentum_decay": "mu_product"},
)
