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

from typing import Any, NamedTuple

from torch import Tensor

from ._core import VJP, Hypers, group_float, reduce_to

HYPERS = ("lr", "momentum", "dampening", "weight_decay")


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


def inactive_hypers(flags: Flags) -> frozenset[str]:
    """momentum is 0 there, so no momentum buffer is kept"""
    return frozenset() if flags.momentum else frozenset({"momentum", "dampening"})


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    buf = torch_state.get("momentum_buffer")
    return State([None if buf is None else buf.detach().clone()])


def write_state(state: State, i: int) -> dict[str, Any]:
    buf = state.momentum_buffer[i]
    return {} if buf is None else {"momentum_buffer": buf}


def step(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor],
         hp: Hypers) -> tuple[list[Tensor], State]:
    new_params: list[Tensor] = []
    new_bufs: list[Tensor | None] = []
    for p, buf, g, lr, mu, tau, wd in zip(params, state.momentum_buffer, grads, hp["lr"],
                                          hp["momentum"], hp["dampening"], hp["weight_decay"]):
        d = (-g if flags.maximize else g) + wd * p                  # (S1)
        if flags.momentum:
            buf = d if buf is None else mu * buf + (1 - tau) * d    # (S2)
            d = d + mu * buf if flags.nesterov else buf             # (S3)
        new_params.append(p - lr * d)                               # (S4)
        new_bufs.append(buf)
    return new_params, State(new_bufs)


def vjp(flags: Flags, params: list[Tensor], state: State, grads: list[Tensor], hp: Hypers,
        cot_params: list[Tensor], cot_state: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/sgd.md, eq. S5–S9)."""
    sign = -1.0 if flags.maximize else 1.0
    b_out: list[Tensor] = []
    s_out: list[Tensor | None] = []
    o_out: list[Tensor] = []
    a_out: Hypers = {name: [] for name in need}
    for i, (p, buf, g, P, S) in enumerate(zip(params, state.momentum_buffer, grads, cot_params,
                                              cot_state.momentum_buffer)):
        lr, mu, tau, wd = (hp[k][i] for k in HYPERS)
        d0 = sign * g + wd * p                                      # (S1), recomputed
        d_bar = -lr * P                                             # ∂θ'/∂d = −γ           (S5)
        a_mu = a_tau = None
        s_in: Tensor | None = None
        if flags.momentum:
            assert S is not None                                    # the step kept a buffer
            new_buf = d0 if buf is None else mu * buf + (1 - tau) * d0
            d = d0 + mu * new_buf if flags.nesterov else new_buf
            if flags.nesterov:
                buf_bar = S + mu * d_bar                            # total adjoint of b'   (S6)
                d0_bar = d_bar
                a_mu = d_bar * new_buf
            else:
                buf_bar = S + d_bar
                d0_bar = d_bar.new_zeros(())
            if buf is None:
                d0_bar = d0_bar + buf_bar                           # b' = d_0 on the first step
            else:
                s_in = mu * buf_bar                                 # S_j = μ·b̄'            (S7)
                d0_bar = d0_bar + (1 - tau) * buf_bar
                a_mu = buf_bar * buf if a_mu is None else a_mu + buf_bar * buf
                a_tau = -buf_bar * d0
        else:
            d = d0
            d0_bar = d_bar
        o_out.append(sign * d0_bar)                                 # o_j = s·d̄_0           (S8)
        b_out.append(P + wd * d0_bar)                               # b_j = P + λ·d̄_0       (S8)
        s_out.append(s_in)
        contrib = {"lr": lambda: -P * d, "momentum": lambda: a_mu, "dampening": lambda: a_tau,
                   "weight_decay": lambda: d0_bar * p}              # (S9)
        for name in need:
            a = contrib[name]()
            like = hp[name][i]
            a_out[name].append(like.new_zeros(like.shape) if a is None else reduce_to(a, like))
    return VJP(b_out, State(s_out), o_out, a_out)
