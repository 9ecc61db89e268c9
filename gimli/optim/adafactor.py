r"""Adafactor: factored second moments, relative step size and update clipping.

The update of ``torch.optim.Adafactor`` for one tensor at step t (proofs/adafactor.md,
eq. F1–F8):

.. math::
    \begin{aligned}
    G &= s\,g, \qquad w = t^{\tau}, \qquad \rho = \min(\gamma,\ t^{-1/2})               && (F1) \\
    \alpha &= \max(\epsilon_2,\ \mathrm{RMS}(\theta))\,\rho, \qquad
        \theta_1 = (1-\gamma\lambda)\,\theta                                           && (F2) \\
    R' &= R + w\,(\mathrm{mean}_{-1} G^2 - R), \qquad
        C' = C + w\,(\mathrm{mean}_{-2} G^2 - C) \quad (\dim\theta \ge 2)              && (F3) \\
    \hat V &= R'\,C' / z, \qquad z = \max(\mathrm{mean}_{-2} R',\ \epsilon_1)
        \quad (\dim\theta \ge 2)                                                       && (F4) \\
    \hat V &= v' = v + w\,(G^2 - v) \quad (\dim\theta \le 1)                           && (F5) \\
    U &= G / \sqrt{q}, \qquad q = \max(\hat V,\ \epsilon_1^2)                           && (F6) \\
    D &= \max(1,\ \nu), \qquad \nu = \mathrm{RMS}(U) / d                                && (F7) \\
    \theta' &= \theta_1 - (\alpha / D)\, U                                              && (F8)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, τ = ``beta2_decay`` (so 1 − β̂₂ = w), ε₁, ε₂ =
``eps``, d = ``d``, λ = ``weight_decay``; RMS(x) = ‖x‖/√numel(x) over the whole tensor.
R (``row_var``, shape [..., m, 1]) and C (``col_var``, shape [..., 1, n]) factor the second
moment of a tensor with two or more dimensions over its last two; a vector (or a 0-dim
tensor) keeps a full ``variance`` v. ``eps[0] = None`` means ε₁ = finfo(dtype).eps; ε₁ must
then be > 0 (with ε₁ = 0 torch itself divides 0 by 0 at a zero gradient row).

Kinks: every max/min above is ``torch.maximum``/``torch.minimum`` in :func:`step`, and the
VJP follows autograd's rule for them: the whole cotangent to the larger (smaller) argument,
half to each at a tie (proofs/adafactor.md §3). ‖·‖ at 0 gets autograd's norm derivative 0.
No √0 guard is needed: q ≥ ε₁² > 0. The update is piecewise smooth in every input, and
smooth away from those ties.

Granularities: ``lr`` and ``weight_decay`` act elementwise and may be one per element.
τ sets the decay of R and C, which are row/column means (one value per row or column, not
per element); ε₁ clamps the row mean of R (one value per matrix) as well as q; ε₂ floors
RMS(θ) and d scales RMS(U), both one number per tensor. A per-element value of these four
has no meaning for a factored tensor, so they are scalar, per group or per tensor.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import NONNEGATIVE, VJP, Interval, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")
_PER_TENSOR = ("scalar", "group", "tensor")


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: int
    row_var: Tensor | None      # R, for tensors with ≥ 2 dimensions
    col_var: Tensor | None      # C, likewise
    variance: Tensor | None     # v, for vectors and 0-dim tensors


def _eps1(group: dict[str, Any]) -> float:
    """ε₁, with torch's default for ``None``: the machine epsilon of the group's dtype
    (torch takes the first stepping tensor's dtype; a group has one dtype in practice)."""
    if group["eps"][0] is not None:
        return group_float(group, "eps", 0)
    params = group["params"]
    return torch.finfo(params[0].dtype if params else torch.get_default_dtype()).eps


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {
        "lr": group_float(group, "lr"),
        "beta2_decay": group_float(group, "beta2_decay"),
        "eps1": _eps1(group),
        "eps2": group_float(group, "eps", 1),
        "d": group_float(group, "d"),
        "weight_decay": group_float(group, "weight_decay"),
    }
    return Flags(bool(group["maximize"])), hypers


def _factored(param: Tensor) -> bool:
    return param.dim() > 1


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def moment(key: str, shape: list[int]) -> Tensor:
        value = torch_state.get(key)
        return param.new_zeros(shape) if value is None else value.detach().clone()

    t = step_count(torch_state)
    if _factored(param):
        shape = list(param.shape)
        row, col = shape[:-1] + [1], shape[:-2] + [1, shape[-1]]
        return State(t, moment("row_var", row), moment("col_var", col), None)
    return State(t, None, None, moment("variance", list(param.shape)))


class _Forward(NamedTuple):
    """The intermediates of (F1)–(F8) for one tensor, shared by step and vjp."""

    t: int
    G: Tensor
    w: Tensor
    rho: Tensor
    rms_theta: Tensor
    a: Tensor           # max(ε₂, RMS(θ))
    mu_r: Tensor | None  # mean₋₁ G², mean₋₂ G² (factored)
    mu_c: Tensor | None
    R1: Tensor | None
    C1: Tensor | None
    rbar: Tensor | None  # mean₋₂ R'
    z: Tensor | None
    V: Tensor           # V̂ (is v' for a vector)
    iota: Tensor        # 1/√q
    U: Tensor
    nu: Tensor
    D: Tensor
    k: Tensor           # α / D
    p1: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> _Forward:
    lr, tau, eps1, eps2, d, wd = (hp[k] for k in HYPERS)
    t = s.step + 1
    G = pc.signed(g, flags.maximize)
    sqrt_n = p.numel() ** 0.5
    w = float(t) ** tau                                             # (F1)
    rho = torch.minimum(lr, lr.new_full((), 1 / t**0.5))
    rms_theta = p.norm() / sqrt_n                                   # (F2)
    a = torch.maximum(eps2, rms_theta)
    p1 = pc.decoupled_decay(p, lr, wd)
    mu_r = mu_c = R1 = C1 = rbar = z = None
    if s.row_var is not None and s.col_var is not None:
        mu_r = G.norm(dim=-1, keepdim=True).square() / G.size(-1)   # (F3)
        mu_c = G.norm(dim=-2, keepdim=True).square() / G.size(-2)
        R1, C1 = torch.lerp(s.row_var, mu_r, w), torch.lerp(s.col_var, mu_c, w)
        rbar = R1.mean(dim=-2, keepdim=True)                        # (F4)
        z = torch.maximum(rbar, eps1)
        V = R1 * C1 / z
    else:
        assert s.variance is not None
        V = torch.lerp(s.variance, G * G, w)                        # (F5)
    iota = torch.maximum(V, eps1 * eps1).rsqrt()                    # (F6)
    U = iota * G
    nu = U.norm() / (sqrt_n * d)                                    # (F7)
    D = torch.maximum(nu, nu.new_ones(()))
    k = a * rho / D
    return _Forward(t, G, w, rho, rms_theta, a, mu_r, mu_c, R1, C1, rbar, z, V, iota, U, nu, D, k,
                    p1)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    return f.p1 - f.k * f.U, State(f.t, f.R1, f.C1, None if f.R1 is not None else f.V)   # (F8)


def _plus(x: Tensor | None, y: Tensor) -> Tensor:
    """x + y, an absent cotangent x counting as 0."""
    return y if x is None else x + y


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adafactor.md, eq. F9–F18)."""
    lr, tau, eps1, eps2, d, wd = (hp[k] for k in HYPERS)
    f = _forward(flags, p, s, g, hp)
    t, n = f.t, p.numel()
    G, U = f.G, f.U
    # (F9) θ' = θ₁ − (α/D) U: the adjoints of α (per element), D and U
    alpha_bar = -P * U / f.D
    D_bar = (P * f.k * U).sum() / f.D
    U_bar = -f.k * P
    # (F10) D = max(1, ν), ν = ‖U‖/(√n d)
    nu_bar = D_bar * pc.max_share(f.nu, f.nu.new_ones(()))
    nu_pos = f.nu > 0
    U_bar = U_bar + torch.where(nu_pos, nu_bar / (n * d * d * torch.where(nu_pos, f.nu, 1.0)),
                                0.0) * U
    d_bar = -nu_bar * f.nu / d
    # (F11) U = ι G, ι = q^{-1/2}, q = max(V̂, ε₁²)
    G_bar = U_bar * f.iota
    q_bar = -0.5 * U_bar * G * f.iota ** 3
    to_V = pc.max_share(f.V, eps1 * eps1)
    V_bar = to_V * q_bar
    eps1_bar = 2 * eps1 * ((1 - to_V) * q_bar).sum()
    S_R = S_C = S_v = None
    if s.row_var is not None and s.col_var is not None:
        assert f.R1 is not None and f.C1 is not None and f.z is not None \
            and f.rbar is not None and f.mu_r is not None and f.mu_c is not None
        # (F12) V̂ = R' C' / z, z = max(mean₋₂ R', ε₁)
        z_bar = -(V_bar * f.V).sum(dim=(-2, -1), keepdim=True) / f.z
        to_rbar = pc.max_share(f.rbar, eps1)
        eps1_bar = eps1_bar + ((1 - to_rbar) * z_bar).sum()
        R1_bar = _plus(S.row_var, (V_bar * f.C1).sum(dim=-1, keepdim=True) / f.z
                       + to_rbar * z_bar / f.R1.size(-2))
        C1_bar = _plus(S.col_var, (V_bar * f.R1).sum(dim=-2, keepdim=True) / f.z)
        # (F13) R' = lerp(R, μ_r, w), C' = lerp(C, μ_c, w): state adjoint and w̄
        S_R = (1 - f.w) * R1_bar
        S_C = (1 - f.w) * C1_bar
        w_bar = (R1_bar * (f.mu_r - s.row_var)).sum() + (C1_bar * (f.mu_c - s.col_var)).sum()
        # (F14) μ_r = mean₋₁ G², μ_c = mean₋₂ G²
        G_bar = G_bar + 2 * f.w * G * (R1_bar / G.size(-1) + C1_bar / G.size(-2))
    else:
        assert s.variance is not None
        v1_bar = _plus(S.variance, V_bar)                           # (F15) v' = lerp(v, G², w)
        S_v = (1 - f.w) * v1_bar
        w_bar = (v1_bar * (G * G - s.variance)).sum()
        G_bar = G_bar + 2 * f.w * G * v1_bar
    o_out = pc.signed(G_bar, flags.maximize)                        # o_j               (F16)
    # (F17) α = max(ε₂, RMS(θ)) ρ, θ₁ = (1 − γλ) θ: the direct path b_j
    a_bar = (alpha_bar * f.rho).sum()
    to_rms = pc.max_share(f.rms_theta, eps2)
    rms_bar = a_bar * to_rms
    rms_pos = f.rms_theta > 0
    decay_bar, lr_decay_bar, wd_bar = pc.decoupled_decay_vjp(P, p, lr, wd, need)
    b_out = decay_bar + torch.where(
        rms_pos, rms_bar / (n * torch.where(rms_pos, f.rms_theta, 1.0)), 0.0) * p
    rho_bar = alpha_bar * f.a
    contrib = {                                                     # (F18)
        "lr": lambda: pc.plus(rho_bar * pc.max_share(-lr, -f.rho.new_full((), 1 / t**0.5)), lr_decay_bar),
        "beta2_decay": lambda: w_bar * f.w * math.log(t),
        "eps1": lambda: eps1_bar,
        "eps2": lambda: a_bar * (1 - to_rms),
        "d": lambda: d_bar,
        "weight_decay": lambda: wd_bar,
    }
    return VJP(b_out, State(0, S_R, S_C, S_v), o_out, {name: contrib[name]() for name in need})


RULE = Rule(
    hypers=HYPERS,
    # as torch.optim.Adafactor's constructor checks them: τ ≤ 0, d ≥ 1, the rest ≥ 0
    ranges={"lr": NONNEGATIVE, "beta2_decay": Interval(hi=0.0), "eps1": NONNEGATIVE,
            "eps2": NONNEGATIVE, "d": Interval(1.0), "weight_decay": NONNEGATIVE},
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    elementwise=False,              # R and C are row/column means; RMS(θ), RMS(U) whole-tensor
    group_keys={"eps1": ("eps", 0), "eps2": ("eps", 1)},           # where param_groups keep them
    granularities={"beta2_decay": _PER_TENSOR, "eps1": _PER_TENSOR, "eps2": _PER_TENSOR,
                   "d": _PER_TENSOR},
)
