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

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import ADAM_RANGES, BETAS_KEYS, VJP, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")


class Flags(NamedTuple):
    amsgrad: bool
    maximize: bool
    decoupled: bool  # AdamW: θ₁ = (1 − γλ)θ instead of g₂ = g + λθ


class State(NamedTuple):
    step: int
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None


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

    return State(step_count(torch_state), moment("exp_avg"), moment("exp_avg_sq"),
                 moment("max_exp_avg_sq") if group["amsgrad"] else None)


class _Forward(NamedTuple):
    """The intermediates of (A1)–(A6), shared by step and vjp."""

    t: int
    g2: Tensor
    p1: Tensor          # θ₁
    m1: Tensor
    v1: Tensor
    u: Tensor
    c1: Tensor          # the hyperparameters' shape (or floats, as β₁ and β₂ may be)
    c2: Tensor
    r: Tensor
    delta: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor],
             after: State | None = None) -> _Forward:
    """(A1)–(A6); with ``after`` (the State :func:`step` produced), m', v' and u are read
    from it: the same values, not computed again; with ``c1`` and ``c2`` among ``hp`` (a
    compiled call: :func:`scalars`), the bias corrections too."""
    lr, b1, b2, eps, wd = (hp[k] for k in HYPERS)
    g2, p1 = pc.weight_decay(g, p, lr, wd, flags.maximize, flags.decoupled)   # (A1), (A2)
    if after is not None:
        m1, v1 = after.exp_avg, after.exp_avg_sq                    # (A3), as step stored them
        u = after.max_exp_avg_sq if after.max_exp_avg_sq is not None else v1    # (A4)
    else:
        m1 = pc.ema(s.exp_avg, g2, b1)                              # (A3)
        v1 = pc.ema(s.exp_avg_sq, g2 * g2, b2)
        u = torch.maximum(s.max_exp_avg_sq, v1) if s.max_exp_avg_sq is not None else v1    # (A4)
    c = hp if "c1" in hp else scalars(s, hp)                        # (A5)
    c1, c2 = c["c1"], c["c2"]
    r = u.sqrt() / pc.root(c2)                                      # (A6)
    return _Forward(s.step + 1, g2, p1, m1, v1, u, c1, c2, r, r + eps)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    theta = f.p1 - (hp["lr"] / f.c1) * f.m1 / f.delta               # (A7)
    return theta, State(f.t, f.m1, f.v1, f.u if flags.amsgrad else None)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adam.md, eq. A8–A15). ``after``: the
    State that :func:`step` returned for these arguments, whose moments are then read
    instead of recomputed.

    Each intermediate is let go as soon as nothing below reads it (the terms of a_j are
    formed where what they read is still held, and added up at the end, in the same
    order): the recompute sweep's peak memory is this function's (benchmarks/README.md,
    Session 12: 0.44 MB over its entry on a 22k-weight MLP, where holding every
    intermediate to the end took 1.2 MB)."""
    f = _forward(flags, p, s, g, hp, after)
    lr, b1, b2, eps, wd = (hp[k] for k in HYPERS)
    g2, v1, r, delta, c1, c2, t = f.g2, f.v1, f.r, f.delta, f.c1, f.c2, f.t
    update = f.m1 / delta                                           # θ' = θ₁ − (γ/c₁)·update
    del f
    step_size = lr / c1
    kappa_P = step_size * (P / delta)                               # κP/δ, κ = γ/c₁
    del delta
    m1_bar = -kappa_P if S.exp_avg is None else S.exp_avg - kappa_P  # (A8)
    delta_bar = kappa_P * update                                    # ∂θ'/∂δ = (γ/c₁) m'/δ²  (A9)
    del kappa_P
    early: dict[str, Tensor] = {}                                   # (A15)'s terms that read them
    if "lr" in need:
        early["lr"] = P * update * (-1 / c1)
    if "beta1" in need:     # ∂θ'/∂c₁ = (γ/c₁²) m'/δ and ∂c₁/∂β₁ = −t β₁^(t−1)
        early["beta1"] = step_size * P * update / c1 * pc.bias_correction_grad(b1, t)
    del update, step_size
    u_bar = pc.sqrt_vjp(delta_bar, r, c2)                           # (A10) r = √u/√c₂, guarded
    if "beta2" in need:     # ∂r/∂c₂ = −r/(2c₂) and ∂c₂/∂β₂ = −t β₂^(t−1)
        early["beta2"] = delta_bar * r / (2 * c2) * pc.bias_correction_grad(b2, t)
    if "eps" in need:
        early["eps"] = delta_bar
    del delta_bar, r
    V = S.exp_avg_sq
    vmax_bar = None
    if s.max_exp_avg_sq is not None:                                # (A11) u = max(v̂, v')
        X_total = u_bar if S.max_exp_avg_sq is None else S.max_exp_avg_sq + u_bar
        to_v = pc.max_share(v1, s.max_exp_avg_sq)
        v1_bar = to_v * X_total if V is None else V + to_v * X_total
        vmax_bar = (1 - to_v) * X_total
        del X_total, to_v
    else:
        v1_bar = u_bar if V is None else V + u_bar
    del u_bar
    g2_bar = torch.addcmul((1 - b1) * m1_bar, 2 * (1 - b2) * g2, v1_bar)   # (A13)
    a: dict[str, Tensor | None] = {}                                # (A15)
    if "beta1" in need:
        a["beta1"] = m1_bar * (s.exp_avg - g2) + early["beta1"]
    if "beta2" in need:
        a["beta2"] = v1_bar * (s.exp_avg_sq - g2 * g2) - early["beta2"]
    del g2
    S_out = State(0, b1 * m1_bar, b2 * v1_bar, vmax_bar)            # (A12)
    del m1_bar, v1_bar
    b_out, o_out, lr_decay_bar, wd_bar = pc.weight_decay_vjp(P, g2_bar, p, lr, wd, flags.maximize,
                                                             flags.decoupled, need)   # (A14)
    if "lr" in need:
        a["lr"] = pc.plus(early["lr"], lr_decay_bar)
    if "eps" in need:
        a["eps"] = early["eps"]
    a["weight_decay"] = wd_bar
    return VJP(b_out, S_out, o_out, {name: a[name] for name in need})


def scalars(s: State, hp: dict[str, Tensor]) -> dict[str, Tensor]:
    """The bias corrections c₁ = 1 − β₁^t and c₂ = 1 − β₂^t of this step (A5); formed before
    a compiled call (``Rule.scalars``), else by :func:`_forward` itself."""
    t = s.step + 1
    return {"c1": pc.bias_correction(hp["beta1"], t), "c2": pc.bias_correction(hp["beta2"], t)}


RULE = Rule(
    hypers=HYPERS,
    ranges=ADAM_RANGES,                 # as torch.optim's constructor checks them
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    floats=("beta1", "beta2", "eps"),
    group_keys=BETAS_KEYS, reads_after=True, scalars=scalars,
)
