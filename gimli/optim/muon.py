r"""Muon: momentum, Newton–Schulz orthogonalisation, decoupled weight decay.

The update of ``torch.optim.Muon`` for one matrix θ ∈ ℝ^{m×n} (proofs/muon.md,
eq. M1–M6):

.. math::
    \begin{aligned}
    B' &= \mu B + (1-\mu)\,g                                                  && (M1) \\
    U  &= (1-\mu)\,g + \mu B' \ \text{(nesterov)} \quad\text{or}\quad U = B'  && (M2) \\
    Z  &= U^\top \ (m > n) \ \text{or}\ Z = U, \qquad
          X_0 = Z / \max(\lVert Z\rVert_F, \epsilon)                           && (M3) \\
    A_k &= X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A_k + c A_k^2)\,X_k,
          \quad k = 0, \dots, K-1                                              && (M4) \\
    O  &= X_K^\top \ (m > n) \ \text{or}\ O = X_K                             && (M5) \\
    \theta' &= (1-\gamma\lambda)\,\theta - \gamma\rho\,O                      && (M6)
    \end{aligned}

γ = ``lr``, λ = ``weight_decay``, μ = ``momentum``, (a, b, c) =
``ns_coefficients`` (learnable as ``ns_a``, ``ns_b``, ``ns_c``), ε = ``eps``,
K = ``ns_steps`` (a static flag). ρ = √max(1, m/n) for ``adjust_lr_fn`` None or
"original", 0.2·√max(m, n) for "match_rms_adamw": a constant of the shape.
Muon has no maximize flag, and steps 2-D parameters only.

Rounding (proofs/muon.md §2): ``torch.optim.Muon`` runs (M3)–(M5) in bfloat16.
:func:`step` returns exactly that rounded O, so it matches torch bit for bit;
its derivative is that of the exact-arithmetic map (M3)–(M5), evaluated in the
parameter's dtype at the same U (a straight-through rounding: the derivative of
a rounding is 0 almost everywhere, which would make every hypergradient through
O vanish). :func:`vjp` back-propagates by hand through the recomputed exact
iterates X_0 … X_K.

(M3) is a clamp: ε has an effect only where ‖Z‖_F < ε; elsewhere its cotangent is 0.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _pieces as pc
from ._core import NONNEGATIVE, REAL, VJP, group_float
from ._rule import Rule

HYPERS = ("lr", "weight_decay", "momentum", "ns_a", "ns_b", "ns_c", "eps")
_GROUP_KEYS = {"ns_a": ("ns_coefficients", 0), "ns_b": ("ns_coefficients", 1),
               "ns_c": ("ns_coefficients", 2)}
# the Newton–Schulz coefficients and ε act on a whole matrix (M3–M4): no per-element value
_WHOLE_MATRIX = ("scalar", "group", "tensor")


class Flags(NamedTuple):
    nesterov: bool
    ns_steps: int               # K in (M4)
    adjust_lr_fn: str | None    # how ρ in (M6) depends on the matrix's shape


class State(NamedTuple):
    momentum_buffer: Tensor


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, float]]:
    hypers = {name: group_float(group, *_GROUP_KEYS.get(name, (name, None))) for name in HYPERS}
    return Flags(bool(group["nesterov"]), int(group["ns_steps"]), group["adjust_lr_fn"]), hypers


def inactive_hypers(flags: Flags) -> dict[str, str]:
    """What cannot be meta-learned under these flags: name → why (a phrase after the name)."""
    why = "has no effect there: ns_steps is 0, so no Newton–Schulz iteration reads the coefficients"
    return dict.fromkeys(("ns_a", "ns_b", "ns_c"), why) if flags.ns_steps == 0 else {}


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    buf = torch_state.get("momentum_buffer")                    # torch starts it at zeros
    return State(torch.zeros_like(param) if buf is None else buf.detach().clone())


def _shape_ratio(flags: Flags, shape: torch.Size) -> float:
    """ρ of (M6), as ``torch.optim._muon._adjust_lr`` computes it."""
    rows, cols = shape[:2]
    if flags.adjust_lr_fn is None or flags.adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if flags.adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _orthogonalize_rounded(u: Tensor, a_: Tensor, b_: Tensor, c_: Tensor, eps_: Tensor,
                           steps: int) -> Tensor:
    """(M3)–(M5) exactly as ``torch.optim.Muon`` evaluates them: in bfloat16, with the
    same operations in the same order (``_zeropower_via_newtonschulz``), and the
    hyperparameters as Python floats. A value only: no graph."""
    a, b, c, eps = (v.detach().item() for v in (a_, b_, c_, eps_))
    x = u.detach().bfloat16()
    tall = u.size(0) > u.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(u.dtype)


class _Exact(NamedTuple):
    """The exact-arithmetic (M3)–(M5) in U's dtype: what the derivative differentiates."""

    tall: bool
    z: Tensor
    norm: Tensor            # ‖Z‖_F
    denom: Tensor           # max(‖Z‖_F, ε)
    xs: list[Tensor]        # X_0 … X_K

    @property
    def out(self) -> Tensor:
        """O of (M5)."""
        return self.xs[-1].mT if self.tall else self.xs[-1]


def _orthogonalize_exact(u: Tensor, a: Tensor, b: Tensor, c: Tensor, eps: Tensor,
                         steps: int) -> _Exact:
    tall = u.size(0) > u.size(1)
    z = u.mT if tall else u                                     # (M3)
    norm = torch.linalg.vector_norm(z)
    denom = torch.clamp(norm, min=eps)
    xs = [z / denom]
    for _ in range(steps):                                      # (M4)
        x = xs[-1]
        gram = x @ x.mT
        xs.append(a * x + (b * gram + c * (gram @ gram)) @ x)
    return _Exact(tall, z, norm, denom, xs)


def _orthogonalize_vjp(ex: _Exact, o_bar: Tensor, a: Tensor, b: Tensor, c: Tensor,
                       eps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ū, ā, b̄, c̄, ε̄ from Ō by hand through (M5), (M4) backwards, (M3)."""
    x_bar = o_bar.mT if ex.tall else o_bar                      # (M7) X̄_K
    x_bar = x_bar.to(ex.z.dtype)    # in U's dtype: a float32 γ per element meets a bfloat16 U
    a_bar = b_bar = c_bar = o_bar.new_zeros(())
    for x in reversed(ex.xs[:-1]):                              # (M8) one iteration, reversed
        gram = x @ x.mT                                         # A_k, recomputed
        gram2 = gram @ gram
        poly = b * gram + c * gram2                             # P_k = bA_k + cA_k², symmetric
        a_bar = a_bar + (x_bar * x).sum()                       # ā += ⟨X̄_{k+1}, X_k⟩
        poly_bar = x_bar @ x.mT                                 # P̄_k = X̄_{k+1} X_kᵀ
        b_bar = b_bar + (poly_bar * gram).sum()                 # b̄ += ⟨P̄_k, A_k⟩
        c_bar = c_bar + (poly_bar * gram2).sum()                # c̄ += ⟨P̄_k, A_k²⟩
        gram_bar = b * poly_bar + c * (poly_bar @ gram + gram @ poly_bar)   # Ā_k
        x_bar = a * x_bar + poly @ x_bar + (gram_bar + gram_bar.mT) @ x     # X̄_k
    # (M9) X_0 = Z/d, d = max(‖Z‖, ε): d̄ = −⟨X̄_0, X_0⟩/d; the clamp sends d̄ to ‖Z‖ where
    # ‖Z‖ ≥ ε (autograd's clamp rule at a tie), else to ε. Guard: ‖Z‖ = 0 can only pass the
    # clamp when ε ≤ 0 (X_0 is then 0/0 anyway); ‖Z‖'s cotangent is 0 there, as autograd's.
    d_bar = -(x_bar * ex.xs[0]).sum() / ex.denom
    to_norm = ex.norm >= eps
    norm_bar = torch.where(to_norm & (ex.norm > 0),
                           d_bar / torch.where(ex.norm > 0, ex.norm, 1.0), 0.0)
    z_bar = x_bar / ex.denom + norm_bar * ex.z
    eps_bar = torch.where(to_norm, 0.0, d_bar)
    return (z_bar.mT if ex.tall else z_bar), a_bar, b_bar, c_bar, eps_bar


class _Forward(NamedTuple):
    """The intermediates of (M1)–(M2) for one matrix, shared by step and vjp."""

    buf: Tensor             # B'
    u: Tensor               # U


def _momentum(flags: Flags, buf: Tensor, g: Tensor, mu: Tensor) -> _Forward:
    if mu.dim() and mu.dtype != buf.dtype:  # a float32 μ per element of a bfloat16 matrix:
        buf, g = buf.to(mu.dtype), g.to(mu.dtype)   # lerp takes one dtype (step() stores B')
    buf1 = torch.lerp(buf, g, 1 - mu)                           # (M1), torch's lerp_
    return _Forward(buf1, torch.lerp(g, buf1, mu) if flags.nesterov else buf1)   # (M2)


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    lr, wd, mu, a, b, c, eps = (hp[k] for k in HYPERS)
    if p.ndim != 2:
        raise ValueError(f"Muon steps 2-D parameters only, not a tensor of shape {tuple(p.shape)}")
    f = _momentum(flags, s.momentum_buffer, g, mu)
    o = _orthogonalize_rounded(f.u, a, b, c, eps, flags.ns_steps)   # (M3)–(M5): torch's value
    if _needs_grad(f.u, a, b, c, eps):                          # ... the exact map's derivative
        exact = _orthogonalize_exact(f.u, a, b, c, eps, flags.ns_steps).out
        o = o + (exact - exact.detach())                        # straight-through (module doc)
    return pc.decoupled_decay(p, lr, wd) - (lr * _shape_ratio(flags, p.shape)) * o, State(f.buf)  # (M6)


def vjp(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor], P: Tensor,
        S: State, need: frozenset[str]) -> VJP:
    """Closed-form cotangents of :func:`step` (proofs/muon.md, eq. M7–M13)."""
    lr, wd, mu, a, b, c, eps = (hp[k] for k in HYPERS)
    buf, M = s.momentum_buffer, S.momentum_buffer
    rho = _shape_ratio(flags, p.shape)
    f = _momentum(flags, buf, g, mu)
    ex = _orthogonalize_exact(f.u, a, b, c, eps, flags.ns_steps)
    o_bar = -(lr * rho) * P                                     # Ō = ∂θ'/∂O ᵀP = −γρP    (M6)
    u_bar, a_bar, b_bar, c_bar, eps_bar = _orthogonalize_vjp(ex, o_bar, a, b, c, eps)  # (M7)–(M9)
    if flags.nesterov:                                          # (M10) U = lerp(g, B', μ)
        buf1_bar = mu * u_bar if M is None else M + mu * u_bar
        g_bar = (1 - mu) * u_bar
        mu_bar = u_bar * (f.buf - g)
    else:
        buf1_bar = u_bar if M is None else M + u_bar
        g_bar = torch.zeros_like(g)
        mu_bar = torch.zeros_like(g)
    s_out = mu * buf1_bar                                       # S_j = μ B̄'              (M11)
    o_out = g_bar + (1 - mu) * buf1_bar                         # o_j                      (M11)
    mu_bar = mu_bar + buf1_bar * (buf - g)                      # (M1): ∂B'/∂μ = B − g
    b_out, lr_decay_bar, wd_bar = pc.decoupled_decay_vjp(P, p, lr, wd, need)   # b_j    (M12)

    def lr_bar() -> Tensor:                                     # O is torch's rounded value
        o = _orthogonalize_rounded(f.u, a, b, c, eps, flags.ns_steps)
        return -(P * rho * o) if lr_decay_bar is None else lr_decay_bar - P * rho * o

    contrib = {                                                 # (M13)
        "lr": lr_bar,
        "weight_decay": lambda: wd_bar,
        "momentum": lambda: mu_bar,
        "ns_a": lambda: a_bar, "ns_b": lambda: b_bar, "ns_c": lambda: c_bar,
        "eps": lambda: eps_bar,
    }
    return VJP(b_out, State(s_out), o_out, {name: contrib[name]() for name in need})


RULE = Rule(
    hypers=HYPERS,
    # as torch.optim.Muon's constructor checks them (the coefficients and ε it does not check)
    ranges={"lr": NONNEGATIVE, "weight_decay": NONNEGATIVE, "momentum": NONNEGATIVE, "ns_a": REAL,
            "ns_b": REAL, "ns_c": REAL, "eps": REAL},
    read_group=read_group, read_state=read_state, step=step, vjp=vjp,
    elementwise=False,              # Newton–Schulz orthogonalises the whole matrix
    group_keys=_GROUP_KEYS,
    granularities={"ns_a": _WHOLE_MATRIX, "ns_b": _WHOLE_MATRIX, "ns_c": _WHOLE_MATRIX,
                   "eps": _WHOLE_MATRIX},
    inactive=inactive_hypers,
    # the step rounds inside (finite differences of L^val cannot check its derivative; gimli.check)
    straight_through=("Muon runs its Newton–Schulz iteration in bfloat16, so L^val is a staircase "
                      "at that scale; gimli (like autograd on the same step) differentiates it "
                      "straight through"),
)
