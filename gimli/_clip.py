"""Gradient clipping inside the unroll, as a training loop applies it between
``backward()`` and ``opt.step()``.

``GimliSolver(clip=ClipGradNorm(max_norm))`` makes every step's gradient
Ĝ_j = clip(∇_θ ℓ_j) before the optimizer reads it, with torch's own formulas
(``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``). The clipping is written
with differentiable torch operations on G_j, so it is part of G_j's graph: the sweep's
one backward call ∇_θ⟨o_j, Ĝ_j⟩ applies the clip's VJP and the Hessian together, and a
learned threshold (a function of the meta-parameters) gets its hypergradient the way
φ^loss does (proofs/clip.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Threshold = float | Callable[[Any], Tensor]     # a number, or meta -> a 0-dim tensor (learned)


def _value(threshold: Threshold, meta: Any) -> float | Tensor:
    return threshold(meta) if callable(threshold) else float(threshold)


@dataclass(frozen=True)
class ClipGradNorm:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`` over the optimizer's
    tensors that have a gradient: the total p-norm n of their norms, then every gradient
    times min(1, max_norm / (n + 10⁻⁶)).

    ``max_norm``: a number, or a function of the meta-parameters that returns it (e.g.
    ``lambda meta: meta["log_max_norm"].exp()``, with ``log_max_norm`` a ``loss=`` entry
    of ``MetaParams``): it is then meta-learned. At n + 10⁻⁶ = max_norm exactly the
    clip has a kink; its derivative there is the clipped branch's, as torch's ``clamp``
    takes it."""

    max_norm: Threshold
    norm_type: float = 2.0

    def __call__(self, grads: list[Tensor | None], meta: Any) -> list[Tensor | None]:
        present = [g for g in grads if g is not None]
        if not present:
            return grads
        norms = torch._foreach_norm(present, self.norm_type)     # one op, as torch's own clip
        total = torch.linalg.vector_norm(torch.stack([n.to(present[0].device) for n in norms]),
                                         self.norm_type)
        coef = torch.clamp(_value(self.max_norm, meta) / (total + 1e-6), max=1.0)
        return [None if g is None else g * coef.to(g.device) for g in grads]


@dataclass(frozen=True)
class ClipGradValue:
    """``torch.nn.utils.clip_grad_value_(params, clip_value)``: every gradient entry
    clamped to [−clip_value, clip_value]. ``clip_value``: a number, or a function of the
    meta-parameters (learned). An entry exactly at ±clip_value passes its cotangent on,
    as torch's ``clamp`` does."""

    clip_value: Threshold

    def __call__(self, grads: list[Tensor | None], meta: Any) -> list[Tensor | None]:
        v = _value(self.clip_value, meta)
        if isinstance(v, Tensor):
            return [None if g is None else torch.clamp(g, min=-v, max=v) for g in grads]
        return [None if g is None else g.clamp(-v, v) for g in grads]


Clip = ClipGradNorm | ClipGradValue


def check_clip(clip: Any) -> None:
    if clip is not None and not isinstance(clip, (ClipGradNorm, ClipGradValue)):
        raise TypeError(f"clip must be gimli.ClipGradNorm(...) or gimli.ClipGradValue(...), "
                        f"not {type(clip).__name__}")
    if clip is not None:
        name, threshold = (("max_norm", clip.max_norm) if isinstance(clip, ClipGradNorm)
                           else ("clip_value", clip.clip_value))
        if not callable(threshold) and not float(threshold) > 0:
            raise ValueError(f"{type(clip).__name__}: {name} must be > 0, got {threshold!r}")
