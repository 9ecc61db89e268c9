r"""RMSprop with momentum, centering, weight decay and maximize.

The update of ``torch.optim.RMSprop`` for one tensor (proofs/rmsprop.md, eq. R1–R6):

.. math::
    \begin{aligned}
    g_2 &= s\,g + \lambda\,\theta                                                  && (R1) \\
    v'  &= \alpha v + (1-\alpha)\,g_2^2                                            && (R2) \\
    \bar g' &= \alpha \bar g + (1-\alpha)\,g_2, \quad w = v' - \bar g'^2 \ \text{(centered)}
        \quad\text{or}\quad w = v'                                                 && (R3) \\
    \delta &= \sqrt{w} + \epsilon, \qquad q = g_2/\delta                           && (R4) \\
    b' &= \mu\,b + q \ \text{(momentum} > 0) \quad\text{or}\quad b' = q            && (R5) \\
    \theta' &= \theta - \gamma\,b'                                                 && (R6)
    \end{aligned}

s = −1 if maximize else 1; γ = ``lr``, α = ``alpha``, ε = ``eps``, λ = ``weight_decay``,
μ = ``momentum``. ``torch.optim`` keeps a momentum buffer b (created as zeros) only when
the group's momentum is > 0, and the running mean ḡ (``grad_avg``) only when centered.

Numerical guard: where w is exactly 0 and the averages started at 0 with 0 < α < 1,
every past g₂ of that element was 0, including this step's, so q = 0 for every w and
the cotangent of w through √ is set to its true value 0 instead of autograd's
0·∞ = NaN (proofs/rmsprop.md §3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._core import (NONNEGATIVE, POSITIVE, VJP, Hypers, Interval, group_float, reduce_to,
                    step_count, step_tensor)

HYPERS = ("lr", "alpha", "eps", "weight_decay", "momentum")
RANGES = dict.fromkeys(HYPERS, NONNEGATIVE)   # as torch.optim.RMSprop's constructor checks them


class Flags(NamedTuple):
    momentum: bool  # the group keeps a momentum buffer (momentum > 0)
    centered: bool
    maximize: bool


class State(NamedTuple):
    step: list[int]
    square_avg: list[Tensor]
    momentum_buffer: list[Tensor | None]
    grad_avg: list[Tensor | None]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {name: group_float(group, name) for name in HYPERS}
    flags = Flags(hypers["momentum"] > 0, bool(group["centered"]), bool(group["maximize"]))
    return flags, hypers


def inactive_hypers(flags: Flags) -> dict[str, str]:
    """What cannot be meta-learned under these flags: name → why (a phrase after the name)."""
    return {} if flags.momentum else {
        "momentum": "has no effect there: it is 0, so torch.optim keeps no momentum buffer (build "
                    "the optimizer with momentum > 0 to meta-learn it)"}


def ranges(flags: Flags) -> dict[str, Interval]:
    """RANGES, with a momentum built > 0 kept > 0: at 0 torch.optim would stop keeping
    the buffer this unroll differentiates."""
    return {**RANGES, "momentum": POSITIVE} if flags.momentum else RANGES


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    def avg(key: str) -> Tensor:
        value = torch_state.get(key)
        return torch.zeros_like(param) if value is None else value.detach().clone()

    return State([step_count(torch_state)], [avg("square_avg")],
                 [avg("momentum_buffer") if group["momentum"] > 0 else None],
                 [avg("grad_avg") if group["centered"] else None])


def write_state(state: State, i: int) -> dict[str, Any]:
    out: dict[str, Any] = {"step": step_tensor(state.step[i]),
                           "square_avg": state.square_avg[i]}
    if state.momentum_buffer[i] is not None:
        out["momentum_buffer"] = state.momentum_buffer[i]
    if state.grad_avg[i] is not None:
        out["grad_avg"] = state.grad_avg[i]
    return out


class _Forward(NamedTuple):
    """The intermediates of (R1)–(R6) for one tensor, shared by step and vjp."""

    g2: Tensor
    v1: Tensor
    ga1: Tensor | None
    root: Tensor
    delta: Tensor
    q: Tensor
    buf1: Tensor | None
    theta: Tensor


def _forward(flags: Flags, p: Tensor, v: Tensor, buf: Tensor | None, ga: Tensor | None,
             g: Tensor, lr: Tensor, alpha: Tensor, eps: Tensor, wd: Tensor,
             mu: Tensor) -> _Forward:
    g2 = (-g if flags.maximize else g) + wd * p                     # (R1)
    v1 = alpha * v + (1 - alpha) * g2 * g2                          # (R2)
    ga1 = None
    if ga is not None:
        ga1 = alpha * ga + (1 - alpha) * g2                         # (R3)
        root = (v1 - ga1 * ga1).sqrt()
    else:
        root = v1.sqrt()
    delta = root + eps                                              # (R4)
    q = g2 / delta
    buf1 = mu * buf + q if buf is not None else None                # (R5)
    return _Forward(g2, v1, ga1, root, delta, q, buf1,
                    p - lr * (buf1 if buf1 is not None else q))     # (R6)


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new = [_forward(flags, p, v, buf, ga, g, *hps)
           for p, v, buf, ga, g, *hps
           in zip(params, state.square_avg, state.momentum_buffer, state.grad_avg, grads,
                  *(hp[k] for k in HYPERS))]
    return [f.theta for f in new], State(
        [t + 1 for t in state.step], [f.v1 for f in new], [f.buf1 for f in new],
        [f.ga1 for f in new])


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/rmsprop.md, eq. R7–R14)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    o_out: list[Tensor] = []
    S_v: list[Tensor] = []
    S_buf: list[Tensor | None] = []
    S_ga: list[Tensor | None] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, v, buf, ga, g, P, V, Bc, Gc) in enumerate(zip(
            params, state.square_avg, state.momentum_buffer, state.grad_avg, grads, cot_params,
            cot_state.square_avg, cot_state.momentum_buffer, cot_state.grad_avg)):
        lr, alpha, eps, wd, mu = (hp[k][i] for k in HYPERS)
        f = _forward(flags, p, v, buf, ga, g, lr, alpha, eps, wd, mu)
        if f.buf1 is not None:
            assert buf is not None and Bc is not None              # the step kept a buffer
            buf1_bar = Bc - lr * P                                  # b̄' = B − γP            (R7)
            q_bar = buf1_bar
            S_buf.append(mu * buf1_bar)                             # S^b_j = μ b̄'           (R12)
        else:
            q_bar = -lr * P                                         # q̄ = −γP               (R7)
            S_buf.append(None)
        delta_bar = -q_bar * f.q / f.delta                          # ∂q/∂δ = −g₂/δ²        (R8)
        # (R9) δ = √w + ε: w̄ = δ̄/(2√w), set to 0 where w = 0 (guard, module doc)
        pos = f.root > 0
        w_bar = torch.where(pos, delta_bar / (2 * torch.where(pos, f.root, 1.0)), 0.0)
        v1_bar = V + w_bar                                          # (R10)
        g2_bar = q_bar / f.delta + 2 * (1 - alpha) * f.g2 * v1_bar  # (R11)
        alpha_bar = v1_bar * (v - f.g2 * f.g2)                      # ∂v'/∂α = v − g₂²      (R14)
        if f.ga1 is not None:
            assert ga is not None and Gc is not None
            ga1_bar = Gc - 2 * f.ga1 * w_bar                        # ∂w/∂ḡ' = −2ḡ'         (R10)
            g2_bar = g2_bar + (1 - alpha) * ga1_bar                 # (R11)
            S_ga.append(alpha * ga1_bar)                            # S^ḡ_j = α ḡ̄'          (R12)
            alpha_bar = alpha_bar + ga1_bar * (ga - f.g2)           # ∂ḡ'/∂α = ḡ − g₂       (R14)
        else:
            S_ga.append(None)
        S_v.append(alpha * v1_bar)                                  # S^v_j = α v̄'          (R12)
        b_out.append(P + wd * g2_bar)                               # b_j = P + λ ḡ₂        (R13)
        o_out.append(sign * g2_bar)                                 # o_j = s ḡ₂            (R13)
        contrib = {                                                 # (R14)
            "lr": lambda: -P * (f.buf1 if f.buf1 is not None else f.q),
            "alpha": lambda: alpha_bar,
            "eps": lambda: delta_bar,
            "weight_decay": lambda: g2_bar * p,
            "momentum": lambda: q_bar * buf if buf is not None else torch.zeros_like(p),
        }
        for name in need:
            a_out[name].append(reduce_to(contrib[name](), hp[name][i]))
    steps_bar = [None] * len(params)                            # step counts have no cotangent
    return VJP(b_out, State(steps_bar, S_v, S_buf, S_ga), o_out, a_out)  # type: ignore[arg-type]
