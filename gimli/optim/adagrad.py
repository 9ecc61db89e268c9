r"""Adagrad with lr_decay, weight decay, initial accumulator and maximize.

The update of ``torch.optim.Adagrad`` for one tensor at step t (the paper's
Appendix A.2, extended; proofs/adagrad.md, eq. G1–G4):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta                                   && (G1) \\
    \Sigma' &= \Sigma + g_2^2                                       && (G2) \\
    \eta_t &= \gamma / (1 + (t-1)\,\kappa), \qquad \delta = \sqrt{\Sigma'} + \epsilon  && (G3) \\
    \theta' &= \theta - \eta_t\, g_2 / \delta                       && (G4)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, κ = ``lr_decay``, λ = ``weight_decay``,
ε = ``eps``. Σ starts at ``initial_accumulator_value`` (set by ``torch.optim``
when the optimizer is built, so it is state, not a learnable hyperparameter).

Numerical guard: where Σ' is exactly 0, g_2 is 0, θ' does not depend on Σ'
there, and the cotangent of Σ' through √ is set to its true value 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._core import (NONNEGATIVE, VJP, Hypers, group_float, reduce_to, step_count, step_tensor,
                   )

HYPERS = ("lr", "lr_decay", "weight_decay", "eps")
RANGES = dict.fromkeys(HYPERS, NONNEGATIVE)   # as torch.optim.Adagrad's constructor checks them


class Flags(NamedTuple):
    maximize: bool


class State(NamedTuple):
    step: list[int]
    sum: list[Tensor]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    return Flags(bool(group["maximize"])), {name: group_float(group, name) for name in HYPERS}


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    acc = torch_state.get("sum")
    if acc is None:
        acc = torch.full_like(param, group_float(group, "initial_accumulator_value"))
    return State([step_count(torch_state)], [acc.detach().clone()])


def write_state(state: State, i: int) -> dict[str, Any]:
    return {"step": step_tensor(state.step[i]), "sum": state.sum[i]}


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new_params: list[Tensor] = []
    new_sums: list[Tensor] = []
    for p, t, acc, g, lr, kappa, wd, eps in zip(params, *state, grads, *(hp[k] for k in HYPERS)):
        g2 = (-g if flags.maximize else g) + wd * p                 # (G1)
        acc = acc + g2 * g2                                         # (G2)
        eta = lr / (1 + t * kappa)                                  # (G3), t = step − 1 here
        new_params.append(p - eta * g2 / (acc.sqrt() + eps))        # (G4)
        new_sums.append(acc)
    return new_params, State([t + 1 for t in state.step], new_sums)


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/adagrad.md, eq. G5–G9)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    s_out: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, t, acc, g, P, Sigma) in enumerate(zip(params, *state, grads, cot_params,
                                                     cot_state.sum)):
        lr, kappa, wd, eps = (hp[k][i] for k in HYPERS)
        g2 = sign * g + wd * p
        root = (acc + g2 * g2).sqrt()
        delta = root + eps
        eta = lr / (1 + t * kappa)
        update = g2 / delta                                         # θ' = θ − η_t·update
        delta_bar = eta * P * update / delta                        # ∂θ'/∂δ = η_t g₂/δ²     (G5)
        pos = root > 0                                              # guard: √ at Σ' = 0
        acc1_bar = Sigma + torch.where(pos, delta_bar / (2 * torch.where(pos, root, 1.0)), 0.0)
        g2_bar = -eta * P / delta + 2 * g2 * acc1_bar               # (G6)
        s_out.append(acc1_bar)                                      # S_j = Σ̄'               (G7)
        b_out.append(P + wd * g2_bar)                               # (G8)
        o_out.append(sign * g2_bar)
        eta_bar = -P * update
        contrib = {                                                 # (G9)
            "lr": lambda: eta_bar / (1 + t * kappa),
            "lr_decay": lambda: -eta_bar * lr * t / (1 + t * kappa) ** 2,
            "weight_decay": lambda: g2_bar * p,
            "eps": lambda: delta_bar,
        }
        for name in need:
            a_out[name].append(reduce_to(contrib[name](), hp[name][i]))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, s_out), o_out, a_out)  # type: ignore[arg-type]
