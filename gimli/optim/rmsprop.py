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

from . import _pieces as pc
from ._core import NONNEGATIVE, POSITIVE, VJP, Interval, group_float, step_count
from ._rule import Rule

HYPERS = ("lr", "alpha", "eps", "weight_decay", "momentum")
RANGES = dict.fromkeys(HYPERS, NONNEGATIVE)   # as torch.optim.RMSprop's constructor checks them


class Flags(NamedTuple):
    momentum: bool  # the group keeps a momentum buffer (momentum > 0)
    centered: bool
    maximize: bool


class State(NamedTuple):
    step: int
    square_avg: Tensor
    momentum_buffer: Tensor | None      # kept only when momentum > 0
    grad_avg: Tensor | None             # kept only when centered


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

    return State(step_count(torch_state), avg("square_avg"),
                 avg("momentum_buffer") if group["momentum"] > 0 else None,
                 avg("grad_avg") if group["centered"] else None)


class _Forward(NamedTuple):
    """The intermediates of (R1)–(R6), shared by step and vjp."""

    g2: Tensor
    v1: Tensor
    ga1: Tensor | None
    root: Tensor
    delta: Tensor
    q: Tensor
    buf1: Tensor | None


def _forward(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor],
             after: State | None = None) -> _Forward:
    """(R1)–(R5); with ``after`` (the State :func:`step` produced), v', the mean ḡ' and the
    buffer are read from it."""
    lr, alpha, eps, wd, mu = (hp[k] for k in HYPERS)
    g2 = pc.coupled_decay(g, p, wd, flags.maximize)                 # (R1)
    v1 = after.square_avg if after is not None else pc.ema(s.square_avg, g2 * g2, alpha)   # (R2)
    ga1 = None
    if s.grad_avg is not None:
        ga1 = after.grad_avg if after is not None and after.grad_avg is not None else \
            pc.ema(s.grad_avg, g2, alpha)                           # (R3)
        root = (v1 - ga1 * ga1).sqrt()
    else:
        root = v1.sqrt()
    delta = root + eps                                              # (R4)
    q = g2 / delta
    buf1 = None
    if s.momentum_buffer is not None:                               # (R5)
        buf1 = after.momentum_buffer if after is not None and after.momentum_buffer is not None else \
            mu * s.momentum_buffer + q
    return _Forward(g2, v1, ga1, root, delta, q, buf1)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    f = _forward(flags, p, s, g, hp)
    theta = p - hp["lr"] * (f.buf1 if f.buf1 is not None else f.q)   # (R6)
    return theta, State(s.step + 1, f.v1, f.buf1, f.ga1)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/rmsprop.md, eq. R7–R14)."""
    f = _forward(flags, p, s, g, hp, after)         # (after=: v', ḡ', b' as step stored them)
    lr, alpha, eps, wd, mu = (hp[k] for k in HYPERS)
    S_buf = mu_bar = None
    if s.momentum_buffer is not None:
        B = S.momentum_buffer
        buf1_bar = -lr * P if B is None else B - lr * P             # b̄' = B − γP            (R7)
        q_bar = buf1_bar
        S_buf = mu * buf1_bar                                       # S^b_j = μ b̄'           (R12)
        mu_bar = buf1_bar * s.momentum_buffer
    else:
        q_bar = -lr * P                                             # q̄ = −γP               (R7)
    delta_bar = -q_bar * f.q / f.delta                              # ∂q/∂δ = −g₂/δ²        (R8)
    w_bar = pc.sqrt_vjp(delta_bar, f.root)                          # (R9) guarded at w = 0
    v1_bar = w_bar if S.square_avg is None else S.square_avg + w_bar    # (R10)
    S_v, sq_bar, alpha_bar = pc.ema_vjp(v1_bar, s.square_avg, f.g2 * f.g2, alpha)  # S^v_j = α v̄' (R12)
    g2_bar = q_bar / f.delta + 2 * f.g2 * sq_bar                    # (R11)
    S_ga = None
    if s.grad_avg is not None:
        assert f.ga1 is not None
        ga1_bar = -2 * f.ga1 * w_bar                                # ∂w/∂ḡ' = −2ḡ'         (R10)
        if S.grad_avg is not None:
            ga1_bar = S.grad_avg + ga1_bar
        S_ga, ga_g2_bar, ga_alpha_bar = pc.ema_vjp(ga1_bar, s.grad_avg, f.g2, alpha)   # (R12)
        g2_bar = g2_bar + ga_g2_bar                                 # (R11)
        alpha_bar = alpha_bar + ga_alpha_bar                        # ∂ḡ'/∂α = ḡ − g₂       (R14)
    b_out, o_out, wd_bar = pc.coupled_decay_vjp(P, g2_bar, p, wd, flags.maximize, need)   # (R13)
    contrib = {                                                     # (R14)
        "lr": lambda: -P * (f.buf1 if f.buf1 is not None else f.q),
        "alpha": lambda: alpha_bar,
        "eps": lambda: delta_bar,
        "weight_decay": lambda: wd_bar,
        "momentum": lambda: mu_bar if mu_bar is not None else torch.zeros_like(p),
    }
    return VJP(b_out, State(0, S_v, S_buf, S_ga),           # b_j = P + λ ḡ₂, o_j = s ḡ₂
               o_out, {name: contrib[name]() for name in need})


RULE = Rule(hypers=HYPERS, ranges=RANGES, read_group=read_group, read_state=read_state,
            step=step, vjp=vjp, inactive=inactive_hypers, narrowed=ranges,
            skips_zero=("weight_decay",), reads_after=True)
