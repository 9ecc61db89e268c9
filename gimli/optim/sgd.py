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

from . import _pieces as pc
from ._core import NONNEGATIVE, POSITIVE, REAL, VJP, Interval, group_float
from ._rule import Rule

HYPERS = ("lr", "momentum", "dampening", "weight_decay")
# as torch.optim.SGD's constructor checks them (dampening it does not check)
RANGES = {"lr": NONNEGATIVE, "momentum": NONNEGATIVE, "dampening": REAL, "weight_decay": NONNEGATIVE}


class Flags(NamedTuple):
    momentum: bool  # the group keeps a momentum buffer (momentum != 0)
    nesterov: bool
    maximize: bool


class State(NamedTuple):
    momentum_buffer: Tensor | None      # None until the tensor's first step with momentum


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


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    buf = torch_state.get("momentum_buffer")
    return State(None if buf is None else buf.detach().clone())


def _damped(tau: Tensor | float, x: Tensor) -> Tensor:
    """(1 − τ)·x; x itself where τ is the param group's number 0 (``Rule.floats``): the same
    value, 1·x = x, without a multiplication or a θ-sized tensor."""
    return x if isinstance(tau, float) and tau == 0.0 else (1 - tau) * x


def _momentum(s: State, d0: Tensor, mu: Tensor | float, tau: Tensor | float) -> Tensor:
    """(S2): b' = d₀ on the first step (no buffer yet), μ·b + (1 − τ)·d₀ after."""
    return d0 if s.momentum_buffer is None else mu * s.momentum_buffer + _damped(tau, d0)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    lr, mu, tau, wd = (hp[k] for k in HYPERS)
    d = pc.coupled_decay(g, p, wd, flags.maximize)                 # (S1)
    buf = None
    if flags.momentum:
        buf = _momentum(s, d, mu, tau)                              # (S2)
        d = d + mu * buf if flags.nesterov else buf                 # (S3)
    return p - lr * d, State(buf)                                   # (S4)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor | None, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str], after: State | None = None) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/sgd.md, eq. S5–S9). The buffer b'
    enters only the cotangents of γ and μ; where they are needed it is read from
    ``after`` (the State :func:`step` returned for these arguments) if given. G enters
    only those of γ, τ and (b' recomputed) μ: ``g`` may be None where none is needed
    (:func:`reads_grad`)."""
    lr, mu, tau, wd = (hp[k] for k in HYPERS)
    d0 = None if g is None else pc.coupled_decay(g, p, wd, flags.maximize)   # (S1), recomputed
    d_bar = -lr * P                                                 # ∂θ'/∂d = −γ           (S5)
    s_in = buf_bar = None
    if flags.momentum:
        if flags.nesterov:
            buf_bar = mu * d_bar if S.momentum_buffer is None else S.momentum_buffer + mu * d_bar  # (S6)
            d0_bar = d_bar
        else:
            buf_bar = d_bar if S.momentum_buffer is None else S.momentum_buffer + d_bar
            d0_bar = None
        if s.momentum_buffer is None:                               # b' = d₀ at first
            d0_bar = buf_bar if d0_bar is None else d0_bar + buf_bar
        else:
            s_in = mu * buf_bar                                     # S_j = μ·b̄'            (S7)
            d0_bar = _damped(tau, buf_bar) if d0_bar is None else d0_bar + _damped(tau, buf_bar)
    else:
        d0_bar = d_bar
    b_out, o_out, wd_bar = pc.coupled_decay_vjp(P, d0_bar, p, wd, flags.maximize, need)   # (S8)

    def given_d0() -> Tensor:           # (only the cotangents that reads_grad names read it)
        assert d0 is not None, "SGD's VJP needs g for the cotangents of lr, dampening and momentum"
        return d0

    def new_buf() -> Tensor:                                        # b' (S2)
        return after.momentum_buffer if after is not None and after.momentum_buffer is not None \
            else _momentum(s, given_d0(), mu, tau)

    def lr_bar() -> Tensor:                                         # a_γ = −P·d  (S9)
        if flags.momentum and not flags.nesterov:
            return -P * new_buf()
        d = given_d0()
        return -P * (d + mu * new_buf() if flags.momentum else d)

    def mu_bar() -> Tensor | None:                                  # a_μ  (S9)
        if buf_bar is None:                                         # (no momentum)
            return None
        old = None if s.momentum_buffer is None else buf_bar * s.momentum_buffer
        return pc.plus(d_bar * new_buf(), old) if flags.nesterov else old

    def tau_bar() -> Tensor | None:                                 # a_τ  (S9)
        return None if buf_bar is None or s.momentum_buffer is None else -buf_bar * given_d0()

    contrib = {"lr": lr_bar, "momentum": mu_bar, "dampening": tau_bar,
               "weight_decay": lambda: wd_bar}                      # (S9)
    return VJP(b_out, State(s_in), o_out, {name: contrib[name]() for name in need})


def reads_grad(flags: Flags, need: frozenset[str]) -> bool:
    """Whether :func:`vjp` reads G for these cotangents: only through d₀ (S1), which only
    a_γ, a_τ and b' (for a_μ, where ``after`` does not hold it) read."""
    return bool(need & {"lr", "dampening", "momentum"})


RULE = Rule(hypers=HYPERS, ranges=RANGES, read_group=read_group, read_state=read_state,
            step=step, vjp=vjp, inactive=inactive_hypers, narrowed=ranges,
            skips_zero=("weight_decay",), floats=("momentum", "dampening"), reads_after=True,
            reads_grad=reads_grad)
