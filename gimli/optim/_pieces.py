r"""Pieces that several torch.optim updates share, each with its VJP written and proved once
(proofs/pieces.md). Every function acts on one tensor (or on a call's tensors laid end to
end: all are elementwise) with hyperparameters that broadcast against it.

* ``signed``: s·g, s = −1 under ``maximize``;
* coupled weight decay (L2 in the gradient): g₂ = s·g + λθ;
* decoupled weight decay (AdamW): θ₁ = (1 − γλ)θ; ``weight_decay`` picks one by flag.
  A weight decay that is the constant 0 (not learned: the call passes the float 0.0,
  :data:`NO_DECAY`) is skipped, as torch.optim skips it, and so is its VJP; the VJPs
  form the cotangents of λ and γ only where ``need`` asks for them;
* the exponential moving average m' = βm + (1 − β)x;
* the bias correction c = 1 − β^t, and √c;
* the square root at 0, whose cotangent is set to its true value 0 where the radicand
  is 0 and nothing downstream depends on it (the optimizers' guards);
* the maximum u = max(x, y), with the cotangent split evenly at a tie.
"""

from __future__ import annotations

import torch
from torch import Tensor


def signed(g: Tensor, maximize: bool) -> Tensor:
    return -g if maximize else g


def plus(a: Tensor, b: Tensor | None) -> Tensor:
    """a + b, or a where b is a cotangent not formed (None)."""
    return a if b is None else a + b


# the weight decay of a call whose λ is the constant 0 (not learned): its terms are skipped
NO_DECAY = 0.0


def _none(wd: Tensor | float) -> bool:
    return isinstance(wd, float) and wd == NO_DECAY


def coupled_decay(g: Tensor, p: Tensor, wd: Tensor | float, maximize: bool) -> Tensor:
    """g₂ = s·g + λθ (P1)."""
    return signed(g, maximize) if _none(wd) else signed(g, maximize) + wd * p


def coupled_decay_vjp(P: Tensor, g2_bar: Tensor, p: Tensor, wd: Tensor | float, maximize: bool,
                      need: frozenset[str]) -> tuple[Tensor, Tensor, Tensor | None]:
    """(b = P + λḡ₂, ḡ, λ̄ if needed) of g₂ = s·g + λθ, given ḡ₂ and the cotangent P that
    reaches θ by the other paths (P2)."""
    b = P if _none(wd) else P + wd * g2_bar
    return b, signed(g2_bar, maximize), g2_bar * p if "weight_decay" in need else None


def decoupled_decay(p: Tensor, lr: Tensor, wd: Tensor | float) -> Tensor:
    """θ₁ = (1 − γλ)θ (P3)."""
    return p if _none(wd) else p * (1 - lr * wd)


def decoupled_decay_vjp(p1_bar: Tensor, p: Tensor, lr: Tensor, wd: Tensor | float,
                        need: frozenset[str]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(θ̄, γ̄ contribution, λ̄), each cotangent of a hyperparameter only if needed (None
    otherwise, and for γ where λ is the constant 0), of θ₁ = (1 − γλ)θ, given θ̄₁ (P4)."""
    if _none(wd):
        return p1_bar, None, None
    return ((1 - lr * wd) * p1_bar, -p1_bar * wd * p if "lr" in need else None,
            -p1_bar * lr * p if "weight_decay" in need else None)


def weight_decay(g: Tensor, p: Tensor, lr: Tensor, wd: Tensor | float, maximize: bool,
                 decoupled: bool) -> tuple[Tensor, Tensor]:
    """(g₂, θ₁): coupled, g₂ = s·g + λθ and θ₁ = θ (P1); decoupled (AdamW's), g₂ = s·g
    and θ₁ = (1 − γλ)θ (P3)."""
    if decoupled:
        return signed(g, maximize), decoupled_decay(p, lr, wd)
    return coupled_decay(g, p, wd, maximize), p


def weight_decay_vjp(P: Tensor, g2_bar: Tensor, p: Tensor, lr: Tensor, wd: Tensor | float, maximize: bool,
                     decoupled: bool, need: frozenset[str]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(b, ḡ, γ̄ contribution, λ̄) of :func:`weight_decay`, given θ̄₁ = P (the update adds
    θ₁ to θ') and ḡ₂ (P2, P4); the cotangents of γ and λ only if needed (else None)."""
    if decoupled:
        b, lr_bar, wd_bar = decoupled_decay_vjp(P, p, lr, wd, need)
        return b, signed(g2_bar, maximize), lr_bar, wd_bar
    b, g_bar, wd_bar = coupled_decay_vjp(P, g2_bar, p, wd, maximize, need)
    return b, g_bar, None, wd_bar


def ema(old: Tensor, x: Tensor, beta: Tensor) -> Tensor:
    """m' = βm + (1 − β)x (P5)."""
    return beta * old + (1 - beta) * x


def ema_vjp(bar: Tensor, old: Tensor, x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(m̄, x̄, β̄) of m' = βm + (1 − β)x, given m̄' (P6)."""
    return beta * bar, (1 - beta) * bar, bar * (old - x)


def bias_correction(beta: Tensor, t: int) -> Tensor:
    """c = 1 − β^t at step t ≥ 1 (P7); a Python float where β is one (``Rule.floats``)."""
    return 1 - beta ** t


def root(x: Tensor | float) -> Tensor | float:
    """√x, of a tensor or of a Python float (a param group's number, ``Rule.floats``; as
    torch.optim takes it, ``x ** 0.5``)."""
    return x ** 0.5 if isinstance(x, float) else x.sqrt()


def bias_correction_grad(beta: Tensor, t: int) -> Tensor:
    """dc/dβ = −t·β^(t−1) (P8)."""
    return -t * beta ** (t - 1)


def sqrt_vjp(bar: Tensor, root: Tensor, scale: Tensor | float | None = None) -> Tensor:
    """The cotangent of x in r = √x given r̄: r̄ / (2r), and 0 where r = 0 (P9: the guard,
    exact wherever nothing downstream depends on x when x = 0). With ``scale`` c > 0, of
    x in r = √(x/c) (Adam's √v'/√c₂): r̄ / (2cr), in one division."""
    positive = root > 0
    twice = 2 if scale is None else 2 * scale
    # differentiated again (forward mode transposes this VJP), no 0 may reach the divisor, or
    # its gradient there is 0·∞ = NaN although torch.where drops the value; else r itself
    # divides (the same values, two operations fewer)
    again = torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in (bar, root, twice))
    return torch.where(positive, bar / (twice * (torch.where(positive, root, 1.0) if again else root)), 0.0)


def max_share(x: Tensor, y: Tensor) -> Tensor:
    """The share of u = max(x, y)'s cotangent that goes to x: 1 where x > y, ½ at a tie,
    0 where x < y (P10; y gets 1 minus it)."""
    return (x > y).to(x.dtype) + 0.5 * (x == y).to(x.dtype)
