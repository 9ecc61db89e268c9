r"""ASGD (averaged SGD) with weight decay and maximize.

The update of ``torch.optim.ASGD`` for one tensor at step t (the step count
after the increment; proofs/asgd.md, eq. AS1–AS6):

.. math::
    \begin{aligned}
    \eta &= R(\gamma) \ \text{(first step: no state yet)} \quad\text{or the stored } \eta  && (AS1) \\
    g_2 &= s\,g + \omega\,\theta                                                          && (AS2) \\
    \theta' &= (1 - \lambda\eta)\,\theta - \eta\,g_2                                      && (AS3) \\
    \bar a' &= \bar a + \mu\,(\theta' - \bar a)                                           && (AS4) \\
    D &= 1 + \lambda\gamma t, \qquad \eta' = R\big(\gamma\,D^{-\alpha}\big)               && (AS5) \\
    m &= \max(t - t_0,\ 1), \qquad \mu' = R(1/m)                                          && (AS6)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, λ = ``lambd``, α = ``alpha``, t₀ = ``t0``,
ω = ``weight_decay``; the state is the step count, η = ``eta``, μ = ``mu`` and
ā = ``ax`` (the averaged iterate). η' and μ' depend on the hyperparameters
directly, η and μ feed θ' and ā', so η, μ and ā all carry state adjoints. ā is
an output only (θ never reads it), so in a sweep from a loss on θ its adjoint,
μ's and hence t₀'s hypergradient are exactly 0 (proofs/asgd.md §4).

``torch.optim`` sets η = lr when it creates the state, at a tensor's first step;
η is therefore ``None`` until then and created inside :func:`step` from
``hp["lr"]`` (AS1), which makes lr's first-step effect differentiable. μ starts
at 1 and ā at 0 (constants).

R, the stored precision: ``torch.optim`` keeps η and μ as 0-dim tensors of its
scalar dtype (float32 unless the default dtype is float64), computes them in
Python floats and rounds them on storing; θ' and ā' then use the rounded
values. To reproduce its numbers, :func:`step` rounds the same way, written as
``x + (round(x) − x).detach()``: the value is torch's, the derivative is that of
the unrounded map (R' = 1; the rounding error is a relative 2⁻²⁴ perturbation,
not a function of the hyperparameters worth differentiating: its true
derivative is 0 almost everywhere). The VJP uses the same R' = 1.

Kink: m = max(t − t₀, 1) is written ``torch.maximum(t − t0, 1)``; at the tie
t − t₀ = 1 autograd gives each side half the cotangent, and so does the VJP
(∂m/∂t₀ = −½ there; AS11).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import (NONNEGATIVE, REAL, VJP, group_float, hyper_dtype, scalar_dtype, step_count,
                    step_tensor)
from ._rule import Rule

HYPERS = ("lr", "lambd", "alpha", "t0", "weight_decay")


class Flags(NamedTuple):
    maximize: bool
    stored_dtype: torch.dtype   # R's precision: the dtype torch.optim keeps η and μ in


class State(NamedTuple):
    step: int
    eta: Tensor | None          # None until the tensor's first step (created from lr, AS1)
    mu: Tensor
    ax: Tensor


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    return (Flags(bool(group["maximize"]), scalar_dtype()),
            {name: group_float(group, name) for name in HYPERS})


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    # η and μ in the hyperparameters' dtype (the parameter's, at least float32, as torch's)
    kw: dict[str, Any] = {"dtype": hyper_dtype(param.dtype), "device": param.device}

    def scalar(key: str) -> Tensor | None:
        value = torch_state.get(key)
        return None if value is None else value.detach().to(**kw, copy=True)

    ax = torch_state.get("ax")
    mu = scalar("mu")
    return State(step_count(torch_state), scalar("eta"),
                 torch.ones((), **kw) if mu is None else mu,
                 torch.zeros_like(param) if ax is None else ax.detach().clone())


def write_state(state: State) -> dict[str, Any]:
    if state.eta is None:                                       # torch has not created it yet
        return {}
    return {"step": step_tensor(state.step), "eta": state.eta.to(scalar_dtype()),
            "mu": state.mu.to(scalar_dtype()), "ax": state.ax}


def _stored(x: Tensor, flags: Flags) -> Tensor:
    """R(x): x rounded to the precision torch.optim stores, with derivative 1 (module doc)."""
    return x + (x.detach().to(flags.stored_dtype).to(x.dtype) - x.detach())


class _Forward(NamedTuple):
    """The intermediates of (AS1)–(AS6), shared by step and vjp."""

    t: int
    eta: Tensor
    g2: Tensor
    theta: Tensor
    ax: Tensor
    D: Tensor
    D_alpha: Tensor     # D^α
    eta1_raw: Tensor    # γ / D^α, before R
    eta1: Tensor
    m: Tensor
    mu1: Tensor


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> _Forward:
    lr, lambd, alpha, t0, wd = (hp[k] for k in HYPERS)
    t = s.step + 1
    eta = _stored(lr, flags) if s.eta is None else s.eta                       # (AS1)
    g2 = pc.coupled_decay(g, p, wd, flags.maximize)                             # (AS2)
    p1 = p * (1 - lambd * eta) - eta * g2                                       # (AS3)
    ax1 = s.ax + s.mu * (p1 - s.ax)                                             # (AS4)
    D = 1 + lambd * lr * t                                                      # (AS5)
    D_alpha = D**alpha
    eta1_raw = lr / D_alpha
    m = torch.maximum(t - t0, torch.ones_like(t0))                              # (AS6)
    return _Forward(t, eta, g2, p1, ax1, D, D_alpha, eta1_raw, _stored(eta1_raw, flags), m,
                    _stored(1 / m, flags))


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    return f.theta, State(f.t, f.eta1, f.mu1, f.ax)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/asgd.md, eq. AS7–AS11).

    Every term is returned per element (the engine sums each to its hyperparameter's or
    state entry's shape): η, μ, η', μ' may be one number for the tensor, and the
    cotangents E and M of η' and μ' then arrive at the tensor's first element only."""
    lr, lambd, alpha, t0, wd = (hp[k] for k in HYPERS)
    f = _forward(flags, p, s, g, hp)
    t = f.t
    A = S.ax
    E = torch.zeros_like(f.eta1_raw) if S.eta is None else S.eta    # cotangents of η', μ'
    M = torch.zeros_like(f.mu1) if S.mu is None else S.mu
    theta1_bar = P if A is None else P + s.mu * A               # (AS7) θ' is read by ā'
    S_ax = None if A is None else (1 - s.mu) * A                # (AS8) ∂ā'/∂ā = 1 − μ
    S_mu = None if A is None else A * (f.theta - s.ax)          #       ∂ā'/∂μ = θ' − ā
    g2_bar = -f.eta * theta1_bar                                # (AS9)
    b_out, o_out, wd_bar = pc.coupled_decay_vjp((1 - lambd * f.eta) * theta1_bar, g2_bar, p, wd,
                                                flags.maximize, need)
    eta_bar = -(lambd * p + f.g2) * theta1_bar                  # (AS10) ∂θ'/∂η = −(λθ + g₂)
    S_eta = None if s.eta is None else eta_bar
    # (AS11) η' = γ D^{−α}: ∂/∂γ = D^{−α} − αλt·η'/D, ∂/∂λ = −αγt·η'/D, ∂/∂α = −η' ln D
    E_over_D = E * f.eta1_raw / f.D
    # μ' = 1/m, m = max(t − t₀, 1): ∂μ'/∂t₀ = π/m², π = 1 (t − t₀ > 1), ½ (tie), 0 (t − t₀ < 1)
    pi = pc.max_share(t - t0, torch.ones_like(t0))
    contrib = {
        "lr": lambda: E / f.D_alpha - alpha * lambd * t * E_over_D
        + (eta_bar if s.eta is None else 0),                        # η = R(γ) at the first step
        "lambd": lambda: -f.eta * p * theta1_bar - alpha * lr * t * E_over_D,
        "alpha": lambda: -E * f.eta1_raw * f.D.log(),
        "t0": lambda: M * pi / (f.m * f.m),
        "weight_decay": lambda: wd_bar,
    }
    return VJP(b_out, State(0, S_eta, S_mu, S_ax), o_out, {name: contrib[name]() for name in need})


RULE = Rule(
    hypers=HYPERS,
    # as torch.optim.ASGD's constructor checks them (α and t₀ it does not check); λ it does not
    # check either, but a negative λ makes D = 1 + λγt negative within a few steps, where
    # torch.optim.ASGD's own η = γ/D^α is complex (λ is a decay): kept ≥ 0
    ranges={"lr": NONNEGATIVE, "lambd": NONNEGATIVE, "alpha": REAL, "t0": REAL,
            "weight_decay": NONNEGATIVE},
    read_group=read_group, read_state=read_state, step=step, vjp=vjp, write_state=write_state,
    skips_zero=("weight_decay",),     # a constant 0: skipped, as torch.optim does
    # η' = R(γ D^{−α}) is per element where γ, λ or α is, μ' = R(1/max(t − t₀, 1)) where t₀
    # is, but torch.optim keeps η and μ as one number per tensor
    scalar_state={"lr": "eta", "lambd": "eta", "alpha": "eta", "t0": "mu"},
    # t0 only moves the averaged iterate ax, which θ never reads: the hypergradient of any
    # loss on θ w.r.t. t0 is identically 0 (its VJP is still exact and tested locally)
    no_hypergradient={"t0": "t0 only moves ASGD's averaged iterate ax, which θ never reads"},
)
