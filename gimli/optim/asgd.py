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

from ._core import (NONNEGATIVE, REAL, VJP, Hypers, group_float, hyper_dtype, reduce_to,
                    scalar_dtype, step_count, step_tensor)

HYPERS = ("lr", "lambd", "alpha", "t0", "weight_decay")
# t0 only moves the averaged iterate ax, which θ never reads: the hypergradient of any
# loss on θ w.r.t. t0 is identically 0 (its VJP is still exact and tested locally)
NO_HYPERGRADIENT = {"t0": "t0 only moves ASGD's averaged iterate ax, which θ never reads"}
# as torch.optim.ASGD's constructor checks them (α and t₀ it does not check); λ it does not
# check either, but a negative λ makes D = 1 + λγt negative within a few steps, where
# torch.optim.ASGD's own η = γ/D^α is complex (λ is a decay): kept ≥ 0
RANGES = {"lr": NONNEGATIVE, "lambd": NONNEGATIVE, "alpha": REAL, "t0": REAL,
          "weight_decay": NONNEGATIVE}
# η' = R(γ D^{−α}) is per element where γ, λ or α is, but torch.optim keeps η as one number per tensor
SCALAR_STATE = {"lr": "eta", "lambd": "eta", "alpha": "eta"}


class Flags(NamedTuple):
    maximize: bool
    stored_dtype: torch.dtype   # R's precision: the dtype torch.optim keeps η and μ in


class State(NamedTuple):
    step: list[int]
    eta: list[Tensor | None]    # None until the tensor's first step (created from lr, AS1)
    mu: list[Tensor]
    ax: list[Tensor]


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
    return State([step_count(torch_state)], [scalar("eta")],
                 [torch.ones((), **kw) if mu is None else mu],
                 [torch.zeros_like(param) if ax is None else ax.detach().clone()])


def write_state(state: State, i: int) -> dict[str, Any]:
    eta = state.eta[i]
    if eta is None:                                             # torch has not created it yet
        return {}
    return {"step": step_tensor(state.step[i]), "eta": eta.to(scalar_dtype()),
            "mu": state.mu[i].to(scalar_dtype()), "ax": state.ax[i]}


def _stored(x: Tensor, flags: Flags) -> Tensor:
    """R(x): x rounded to the precision torch.optim stores, with derivative 1 (module doc)."""
    return x + (x.detach().to(flags.stored_dtype).to(x.dtype) - x.detach())


class _Forward(NamedTuple):
    """The intermediates of (AS1)–(AS6) for one tensor, shared by step and vjp."""

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


def _forward(flags: Flags, t: int, p: Tensor, eta: Tensor | None, mu: Tensor, ax: Tensor,
             g: Tensor, lr: Tensor, lambd: Tensor, alpha: Tensor, t0: Tensor,
             wd: Tensor) -> _Forward:
    eta = _stored(lr, flags) if eta is None else eta                           # (AS1)
    g2 = (-g if flags.maximize else g) + wd * p                                 # (AS2)
    p1 = p * (1 - lambd * eta) - eta * g2                                       # (AS3)
    ax1 = ax + mu * (p1 - ax)                                                   # (AS4)
    D = 1 + lambd * lr * t                                                      # (AS5)
    D_alpha = D**alpha
    eta1_raw = lr / D_alpha
    m = torch.maximum(t - t0, torch.ones_like(t0))                              # (AS6)
    return _Forward(eta, g2, p1, ax1, D, D_alpha, eta1_raw, _stored(eta1_raw, flags), m,
                    _stored(1 / m, flags))


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, t + 1, p, eta, mu, ax, g, lr, lambd, alpha, t0, wd)
           for p, t, eta, mu, ax, g, lr, lambd, alpha, t0, wd
           in zip(params, *state, grads, *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.eta1 for f in new], [f.mu1 for f in new],
        [f.ax for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/asgd.md, eq. AS7–AS11)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_eta: list[Tensor | None] = []
    S_mu: list[Tensor] = []
    S_ax: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, t, eta, mu, ax, g, P, E, M, A) in enumerate(zip(
            params, *state, grads, cot_params, cot_state.eta, cot_state.mu, cot_state.ax)):
        lr, lambd, alpha, t0, wd = (hp[k][i] for k in HYPERS)
        t = t + 1
        f = _forward(flags, t, p, eta, mu, ax, g, lr, lambd, alpha, t0, wd)
        theta1_bar = P + mu * A                                     # (AS7) θ' is read by ā'
        S_ax.append(reduce_to((1 - mu) * A, ax))                    # (AS8) ∂ā'/∂ā = 1 − μ
        S_mu.append(reduce_to(A * (f.theta - ax), mu))              #       ∂ā'/∂μ = θ' − ā
        g2_bar = -f.eta * theta1_bar                                # (AS9)
        b_out.append((1 - lambd * f.eta) * theta1_bar + wd * g2_bar)
        o_out.append(sign * g2_bar)
        eta_bar = -(lambd * p + f.g2) * theta1_bar                  # (AS10) ∂θ'/∂η = −(λθ + g₂)
        S_eta.append(None if eta is None else reduce_to(eta_bar, eta))
        # (AS11) η' = γ D^{−α}: ∂/∂γ = D^{−α} − αλt·η'/D, ∂/∂λ = −αγt·η'/D, ∂/∂α = −η' ln D
        E_over_D = E * f.eta1_raw / f.D
        # μ' = 1/m, m = max(t − t₀, 1): ∂μ'/∂t₀ = π/m², π = 1 (t − t₀ > 1), ½ (tie), 0 (t − t₀ < 1)
        pi = (t - t0 > 1).to(t0.dtype) + 0.5 * (t - t0 == 1).to(t0.dtype)
        # each term is summed to the hyperparameter's shape on its own: θ-path terms have
        # θ's shape, η'/μ'-path terms the state's (0-dim for a 0-dim hyperparameter)
        contrib = {
            "lr": lambda: (E / f.D_alpha - alpha * lambd * t * E_over_D,
                           eta_bar if eta is None else None),
            "lambd": lambda: (-f.eta * p * theta1_bar, -alpha * lr * t * E_over_D),
            "alpha": lambda: (-E * f.eta1_raw * f.D.log(),),
            "t0": lambda: (M * pi / (f.m * f.m),),
            "weight_decay": lambda: (g2_bar * p,),
        }
        for name in need:
            like = hp[name][i]
            a_out[name].append(sum((reduce_to(a, like) for a in contrib[name]() if a is not None),
                                   torch.zeros_like(like)))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_eta, S_mu, S_ax), o_out, a_out)  # type: ignore[arg-type]
