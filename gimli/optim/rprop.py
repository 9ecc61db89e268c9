r"""Rprop (resilient backpropagation) with maximize.

The update of ``torch.optim.Rprop`` for one tensor (proofs/rprop.md, eq. P1–P6):

.. math::
    \begin{aligned}
    g_s &= s\,g, \qquad \sigma = \operatorname{sign}(g_s\,p)                          && (P1) \\
    f &= \eta_+ \ (\sigma > 0), \quad \eta_- \ (\sigma < 0), \quad 1 \ (\sigma = 0)   && (P2) \\
    \eta &= \gamma \ \text{(first step: no step size yet)} \quad\text{or the stored } \eta && (P3) \\
    x &= \eta\,f, \qquad \eta' = \operatorname{clamp}(x, \Gamma_{\min}, \Gamma_{\max})  && (P4) \\
    p' &= \hat g = 0 \ (\sigma < 0) \quad\text{or}\quad g_s \ (\sigma \ge 0)             && (P5) \\
    \theta' &= \theta - \operatorname{sign}(\hat g)\,\eta'                               && (P6)
    \end{aligned}

s = −1 if maximize else 1; p = ``prev`` (the last masked gradient, state), η =
``step_size`` (state), γ = ``lr``, (η₋, η₊) = ``etas``, (Γ_min, Γ_max) =
``step_sizes``.

``lr`` only sets the step size when ``torch.optim`` creates the state, at a
tensor's first step. The step size is therefore kept as ``None`` until then and
created inside :func:`step` from ``hp["lr"]`` (P3): ``lr`` is differentiable for
an optimizer that has not stepped yet, and has no effect (cotangent 0) on one
that has.

Piecewise constant in G: σ, f, the mask of P5 and sign(ĝ) are piecewise
constant in g and p, so the derivative of θ' and η' with respect to G (and of
everything with respect to p) is 0 almost everywhere, and 0 is also what
autograd gives for ``sign`` everywhere. Only p' = ĝ, a masked copy of the
gradient, depends on G (proofs/rprop.md §3). The step size and θ still depend
differentiably on the etas, on Γ_min/Γ_max where the clamp is active, and on
lr. The clamp's kinks follow autograd's convention for ``torch.clamp`` with
tensor bounds (P8).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import NONNEGATIVE, REAL, VJP, Interval, group_float, step_count, step_tensor
from ._rule import Rule

HYPERS = ("lr", "etaminus", "etaplus", "step_size_min", "step_size_max")
_GROUP_KEYS = {"etaminus": ("etas", 0), "etaplus": ("etas", 1),    # where param_groups keep them
               "step_size_min": ("step_sizes", 0), "step_size_max": ("step_sizes", 1)}


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: int
    prev: Tensor
    step_size: Tensor | None    # None until the tensor's first step (created from lr, P3)


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {name: group_float(group, *_GROUP_KEYS.get(name, (name, None))) for name in HYPERS}
    return Flags(bool(group["maximize"])), hypers


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    prev = torch_state.get("prev")
    size = torch_state.get("step_size")
    return State(step_count(torch_state),
                 torch.zeros_like(param) if prev is None else prev.detach().clone(),
                 None if size is None else size.detach().clone())


def write_state(state: State) -> dict[str, Any]:
    if state.step_size is None:                                 # torch has not created it yet
        return {}
    return {"step": step_tensor(state.step), "prev": state.prev, "step_size": state.step_size}


class _Forward(NamedTuple):
    """The intermediates of (P1)–(P6), shared by step and vjp."""

    sigma: Tensor
    f: Tensor
    eta: Tensor
    x: Tensor
    eta1: Tensor
    g_hat: Tensor
    d: Tensor           # sign(ĝ)


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> _Forward:
    lr, eta_minus, eta_plus, lo, hi = (hp[k] for k in HYPERS)
    g = pc.signed(g, flags.maximize)
    sigma = (g * s.prev).sign()                                                 # (P1)
    f = torch.where(sigma > 0, eta_plus, torch.where(sigma < 0, eta_minus, 1.0))  # (P2)
    eta = lr.expand(p.shape) if s.step_size is None else s.step_size           # (P3)
    x = eta * f                                                                 # (P4)
    eta1 = torch.clamp(x, min=lo, max=hi)
    g_hat = torch.where(sigma < 0, 0.0, g)                                      # (P5)
    d = g_hat.sign()
    return _Forward(sigma, f, eta, x, eta1, g_hat, d)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    return p - f.d * f.eta1, State(s.step + 1, f.g_hat, f.eta1)       # (P6)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/rprop.md, eq. P7–P10)."""
    lr, lo, hi = hp["lr"], hp["step_size_min"], hp["step_size_max"]
    f = _forward(flags, p, s, g, hp)
    eta1_bar = -f.d * P if S.step_size is None else S.step_size - f.d * P   # (P7) η̄' = E − sign(ĝ)·P
    # (P8) clamp with tensor bounds, autograd's convention: ties go to x
    inside = (f.x >= lo) & (f.x <= hi)
    x_bar = torch.where(inside, eta1_bar, 0.0)
    lo_bar = torch.where((f.x < lo) & (lo < hi), eta1_bar, 0.0)
    hi_bar = torch.where((f.x > hi) | (hi < lo), eta1_bar, 0.0)
    eta_bar = f.f * x_bar                                       # (P9) η̄ = f·x̄
    S_size = None if s.step_size is None else eta_bar           # S_j for the step size
    S_prev = torch.zeros_like(s.prev)                           # (P10) p is read by σ only
    o_out = torch.zeros_like(g) if S.prev is None else \
        torch.where(f.sigma < 0, 0.0, pc.signed(S.prev, flags.maximize))    # (P10) o_j: p' = ĝ
    contrib = {                                                 # (P9)
        "lr": lambda: eta_bar if s.step_size is None else torch.zeros_like(lr),
        "etaminus": lambda: torch.where(f.sigma < 0, x_bar * f.eta, 0.0),
        "etaplus": lambda: torch.where(f.sigma > 0, x_bar * f.eta, 0.0),
        "step_size_min": lambda: lo_bar,
        "step_size_max": lambda: hi_bar,
    }
    return VJP(P, State(0, S_prev, S_size), o_out,              # (P7) b_j = P
               {name: contrib[name]() for name in need})


RULE = Rule(
    hypers=HYPERS,
    # as torch.optim.Rprop's constructor checks them: 0 < η₋ < 1 < η₊ (the step sizes it does not check)
    ranges={"lr": NONNEGATIVE, "etaminus": Interval(0.0, 1.0, lo_open=True, hi_open=True),
            "etaplus": Interval(1.0, lo_open=True), "step_size_min": REAL, "step_size_max": REAL},
    read_group=read_group, read_state=read_state, step=step, vjp=vjp, write_state=write_state,
    group_keys=_GROUP_KEYS,
    insensitive_to_g="uses only the sign of the gradient (∂θ'/∂G = 0 almost everywhere)",
)
