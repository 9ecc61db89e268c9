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

from . import _pieces as pc
from ._core import ADAM_RANGES, BETAS_KEYS, VJP, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")


class Flags(NamedTuple):
    maximize: bool
    decoupled: bool  # θ₁ = (1 − γλ)θ instead of g₂ = g + λθ


class State(NamedTuple):
    step: int
    exp_avg: Tensor
    exp_avg_sq: Tensor


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

    return State(step_count(torch_state), moment("exp_avg"), moment("exp_avg_sq"))


class _Forward(NamedTuple):
    """The intermediates of (RA1)–(RA7), shared by step and vjp."""

    t: int
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
    p1: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor],
             after: State | None = None) -> _Forward:
    """(RA1)–(RA6); with ``after`` (the State :func:`step` produced), m' and v' are read from
    it; with ``c1``, ``c2``, ``rho_inf`` and ``rho_t`` among ``hp`` (a compiled call:
    :func:`scalars`), those."""
    lr, b1, b2, eps, wd = (hp[k] for k in HYPERS)
    t = s.step + 1
    g2, p1 = pc.weight_decay(g, p, lr, wd, flags.maximize, flags.decoupled)   # (RA1), (RA2)
    if after is not None:                                           # (RA3), as step stored them
        m1, v1 = after.exp_avg, after.exp_avg_sq
    else:
        m1 = pc.ema(s.exp_avg, g2, b1)                              # (RA3)
        v1 = pc.ema(s.exp_avg_sq, g2 * g2, b2)
    c = hp if "c1" in hp else scalars(s, hp)                        # (RA4), (RA5)
    c1, c2, rho_inf, rho_t = c["c1"], c["c2"], c["rho_inf"], c["rho_t"]
    # (RA6), the switch: elementwise, for a β₂ learned per element (or spread over a call)
    on = rho_t > 5
    rt, ri = torch.where(on, rho_t, 6.0), torch.where(on, rho_inf, 6.0)
    R = ((rt - 4) * (rt - 2) * ri / ((ri - 4) * (ri - 2) * rt)).sqrt()
    root = torch.where(on, v1, 1.0).sqrt()
    delta = root + eps
    k = torch.where(on, R * c2.sqrt() / delta, 1.0)
    return _Forward(t, g2, m1, v1, c1, c2, on, rt, ri, R, root, delta, k, p1)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    return f.p1 - hp["lr"] * (f.m1 / f.c1) * f.k, State(f.t, f.m1, f.v1)   # (RA7)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/radam.md, eq. RA8–RA15)."""
    lr, b1, b2, eps, wd = (hp[k] for k in HYPERS)
    f = _forward(flags, p, s, g, hp, after)         # (after=: m', v' as step stored them)
    t, on = f.t, f.on
    step_size = lr / f.c1
    kP = step_size * f.k * P
    m1_bar = -kP if S.exp_avg is None else S.exp_avg - kP           # (RA8)
    k_bar = -step_size * f.m1 * P                                   # (RA9) ∂θ'/∂k = −γm'/c₁
    c1_bar = step_size * f.m1 * f.k * P / f.c1                      # ∂θ'/∂c₁ = γm'k/c₁²
    # (RA10) rectified branch only: k = R√c₂/δ
    delta_bar = torch.where(on, -k_bar * f.k / f.delta, 0.0)        # ∂k/∂δ = −k/δ
    c2_bar = torch.where(on, k_bar * f.k / (2 * f.c2), 0.0)         # ∂k/∂c₂ = k/(2c₂)
    R_bar = torch.where(on, k_bar * f.c2.sqrt() / f.delta, 0.0)     # ∂k/∂R = √c₂/δ
    # v̄' through δ = √v' + ε: δ̄/(2√v'), set to 0 where v' = 0 (guard, module doc);
    # off the rectified branch δ̄ = 0 and √ was taken of 1
    v1_from_delta = pc.sqrt_vjp(delta_bar, torch.where(on, f.root, 0.0))
    v1_bar = v1_from_delta if S.exp_avg_sq is None else S.exp_avg_sq + v1_from_delta
    # (RA11) ∂ ln R/∂ρ_t and ∂ ln R/∂ρ_∞, then ρ_t = ρ_∞ − h(β₂)
    half_R = R_bar * f.R / 2
    rho_t_bar = half_R * (1 / (f.rho_t - 4) + 1 / (f.rho_t - 2) - 1 / f.rho_t)
    rho_inf_bar = half_R * (1 / f.rho_inf - 1 / (f.rho_inf - 4) - 1 / (f.rho_inf - 2)) \
        + rho_t_bar
    g2_bar = (1 - b1) * m1_bar + 2 * (1 - b2) * f.g2 * v1_bar       # (RA13)
    b_out, o_out, lr_decay_bar, wd_bar = pc.weight_decay_vjp(P, g2_bar, p, lr, wd, flags.maximize,
                                                             flags.decoupled, need)   # (RA14)
    contrib = {                                                     # (RA15)
        "lr": lambda: pc.plus(-(P * f.m1 * f.k / f.c1), lr_decay_bar),
        "beta1": lambda: m1_bar * (s.exp_avg - f.g2) + c1_bar * pc.bias_correction_grad(b1, t),
        "beta2": lambda: v1_bar * (s.exp_avg_sq - f.g2 * f.g2) + c2_bar * pc.bias_correction_grad(b2, t)
        + rho_inf_bar * 2 / (1 - b2) ** 2 - rho_t_bar * 2 * t * t * b2 ** (t - 1) / f.c2 ** 2,
        "eps": lambda: delta_bar,
        "weight_decay": lambda: wd_bar,
    }
    return VJP(b_out, State(0, b1 * m1_bar, b2 * v1_bar),           # (RA12) state adjoint
               o_out, {name: contrib[name]() for name in need})


def scalars(s: State, hp: dict[str, Tensor]) -> dict[str, Tensor]:
    """The numbers of this step that depend on the step count t (or on β₂ alone): c₁ = 1 − β₁^t,
    c₂ = 1 − β₂^t (RA4), ρ_∞ and ρ_t (RA5); formed before a compiled call (``Rule.scalars``),
    else by :func:`_forward` itself."""
    t, b2 = s.step + 1, hp["beta2"]
    c2 = pc.bias_correction(b2, t)
    rho_inf = 2 / (1 - b2) - 1
    return {"c1": pc.bias_correction(hp["beta1"], t), "c2": c2, "rho_inf": rho_inf,
            "rho_t": rho_inf - 2 * t * b2**t / c2}


RULE = Rule(
    hypers=HYPERS,
    ranges=ADAM_RANGES,                 # as torch.optim's constructor checks them
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    reads_after=True, scalars=scalars,
    group_keys=BETAS_KEYS,
)
