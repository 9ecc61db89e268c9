r"""SGD with momentum, dampening, Nesterov, weight decay and maximize.

The update of ``torch.optim.SGD`` for one tensor (proofs/sgd.md, eq. S1–S4):

.. math::
    \begin{aligned}
    d_0 &= s\,g + \lambda\,\theta                       && (S1),\ s = -1 \text{ if maximize else } 1 \\
    b'  &= \begin{cases} d_0 & \text{first step (no buffer yet)} \\
                         \mu\,b + (1-\tau)\,d_0 & \text{otherwise} \end{cases} && (S2) \\
    d   &= d_0 + \mu\,b' \ \text{(nesterov)} \quad\text{or}\quad d = b'   && (S3) \\
    \theta' &= \theta - \gamma\,d                        && (S4)
    \end{aligned}

With ``momentum == 0`` no buffer exists and d = d_0. Hyperparameters:
γ = ``lr``, μ = ``momentum``, τ = ``dampening``, λ = ``weight_decay``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

from torch import Tensor

from ._core import (NONNEGATIVE, POSITIVE, REAL, VJP, Hypers, Interval, group_float,
                   )
from ._lists import Tensors

HYPERS = ("lr", "momentum", "dampening", "weight_decay")
# as torch.optim.SGD's constructor checks them (dampening it does not check)
RANGES = {"lr": NONNEGATIVE, "momentum": NONNEGATIVE, "dampening": REAL, "weight_decay": NONNEGATIVE}


class Flags(NamedTuple):
    momentum: bool  # the group keeps a momentum buffer (momentum != 0)
    nesterov: bool
    maximize: bool


class State(NamedTuple):
    momentum_buffer: list[Tensor | None]


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {name: group_float(group, name) for name in HYPERS}
    flags = Flags(hypers["momentum"] != 0.0, bool(group["nesterov"]), bool(group["maximize"]))
    return flags, hypers


def inactive_hypers(flags: Flags) -> dict[str, str]:
    """What cannot be meta-learned under these flags: name → why (a phrase after the name)."""
    if not flags.momentum:
        why = ("has no effect there: momentum is 0, so torch.optim keeps no momentum buffer "
               "(build the optimizer with momentum > 0 to meta-learn it)")
        return {"momentum": why, "dampening": why}
    if flags.nesterov:
        return {"dampening": "cannot be meta-learned there: nesterov=True, and torch.optim.SGD "
                             "requires dampening = 0 with Nesterov momentum (its constructor "
                             "refuses any other value)"}
    return {}


def ranges(flags: Flags) -> dict[str, Interval]:
    """RANGES, with a momentum built ≠ 0 kept > 0: at 0 torch.optim would stop keeping
    the buffer this unroll differentiates (and Nesterov requires momentum > 0)."""
    return {**RANGES, "momentum": POSITIVE} if flags.momentum else RANGES


def substep(state: State, i: int) -> bool:
    """Whether tensor i already has a momentum buffer: a tensor whose gradient was
    ``None`` so far has none while the rest of its group has one."""
    return state.momentum_buffer[i] is not None


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    buf = torch_state.get("momentum_buffer")
    return State([None if buf is None else buf.detach().clone()])


def write_state(state: State, i: int) -> dict[str, Any]:
    buf = state.momentum_buffer[i]
    return {} if buf is None else {"momentum_buffer": buf}


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    p, g = Tensors(params), Tensors(grads)
    lr, mu, tau, wd = (Tensors(hp[k]) for k in HYPERS)
    d = (-g if flags.maximize else g) + wd * p                      # (S1)
    bufs: list[Tensor | None] = [None] * len(params)
    if flags.momentum:
        buf = _momentum(state, d, mu, tau)                          # (S2)
        bufs = list(buf)
        d = d + mu * buf if flags.nesterov else buf                 # (S3)
    return list(p - lr * d), State(bufs)                            # (S4)


def _momentum(state: State, d0: Tensors, mu: Tensors, tau: Tensors) -> Tensors:
    """(S2): b' = d₀ on the first step (no buffer yet), μ·b + (1 − τ)·d₀ after."""
    if state.momentum_buffer[0] is None:
        return d0
    return mu * Tensors(cast(list[Tensor], state.momentum_buffer)) + (1 - tau) * d0


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/sgd.md, eq. S5–S9)."""
    p, g, P = Tensors(params), Tensors(grads), Tensors(cot_params)
    lr, mu, tau, wd = (Tensors(hp[k]) for k in HYPERS)
    d0 = (-g if flags.maximize else g) + wd * p                     # (S1), recomputed
    d_bar = -lr * P                                                 # ∂θ'/∂d = −γ           (S5)
    s_in: list[Tensor | None] = [None] * len(params)
    a_mu = a_tau = None
    if flags.momentum:
        first = state.momentum_buffer[0] is None                    # all or none (substep)
        new_buf = _momentum(state, d0, mu, tau)
        d = d0 + mu * new_buf if flags.nesterov else new_buf
        S = Tensors(cast(list[Tensor], cot_state.momentum_buffer))  # the step kept a buffer
        if flags.nesterov:
            buf_bar = S + mu * d_bar                                # total adjoint of b'   (S6)
            d0_bar = d_bar
            a_mu = d_bar * new_buf
        else:
            buf_bar = S + d_bar
            d0_bar = None
        if first:
            d0_bar = buf_bar if d0_bar is None else d0_bar + buf_bar    # b' = d₀ at first
        else:
            buf = Tensors(cast(list[Tensor], state.momentum_buffer))
            s_in = list(mu * buf_bar)                               # S_j = μ·b̄'            (S7)
            d0_bar = (1 - tau) * buf_bar if d0_bar is None else d0_bar + (1 - tau) * buf_bar
            a_mu = buf_bar * buf if a_mu is None else a_mu + buf_bar * buf
            a_tau = -buf_bar * d0
    else:
        d = d0
        d0_bar = d_bar
    o_out = -d0_bar if flags.maximize else d0_bar                   # o_j = s·d̄₀           (S8)
    b_out = P + wd * d0_bar                                         # b_j = P + λ·d̄₀       (S8)
    contrib = {"lr": lambda: -P * d, "momentum": lambda: a_mu, "dampening": lambda: a_tau,
               "weight_decay": lambda: d0_bar * p}                  # (S9)
    a_out: Hypers = {}
    for name in need:
        a = contrib[name]()
        a_out[name] = [like.new_zeros(like.shape) for like in hp[name]] if a is None \
            else a.sum_to(hp[name])
    return VJP(list(b_out), State(s_in), list(o_out), a_out)
