r"""Implicit hypergradients: the end point of an inner loop run to convergence.

When the inner loop reaches a stationary point θ* of the training loss,
g(θ*, φ) = ∇_θ ℓ(θ*, φ) = 0, the implicit function theorem gives how θ* moves with φ
without looking at the path that led there:

    dθ*/dφ = −H⁻¹ ∂_φ g,            H = ∇²_θ ℓ(θ*, φ)
    dL^val/dφ = ∂_φ L^val − (∂_φ g)ᵀ v,   where H v = ∇_θ L^val(θ*)

(Lorraine et al. 2020; Rajeswaran et al. 2019 for θ₀). gimli runs the inner loop with
the user's own optimizer (no graph kept), then solves the linear system matrix-free
with Hessian-vector products of ℓ at θ*, and gets the mixed term (∂_φ g)ᵀ v as
∇_φ⟨g, v⟩: one more backward pass through the same graph.

* ``"cg"``: conjugate gradients on (H + δI) v = b, stopped at a relative residual
  ``tol`` or after ``iterations`` products; it needs H + δI positive definite (a
  non-convex ℓ: raise ``damping`` δ);
* ``"minres"``: the minimum-residual method (Paige and Saunders 1975) on the same
  system, for a symmetric H + δI that need not be definite: the Hessian of a non-convex
  ℓ at a saddle, or iMAML's H + λI where the curvature of ℓ goes below −λ;
* ``"neumann"``: v = α Σ_{k<K} (I − α(H + δI))^k b, converging for
  0 < α < 2/λ_max (α defaults to 1/λ_max, estimated by power iteration);
* ``"dense"``: H formed from its columns (batched backward passes, 256 columns each)
  and solved exactly, for small problems and for tests.

θ₀ (``init=``) has an implicit hypergradient only through iMAML's proximal term:
the inner loss becomes ℓ + λ/2‖θ − θ₀‖², so ∂_{θ₀} g = −λI and dL^val/dθ₀ = λv.
An optimizer hyperparameter has none: at a stationary point θ* does not depend on
the step rule that reached it (``mode="reverse"`` or ``"forward"`` differentiate the
path instead).

The theorem holds at a stationary point; the solver reports how close the end point
is (‖∇_θ ℓ(θ*)‖) with the solve's residual (:class:`ImplicitReport`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ._problem import Problem, grad_of
from ._sweep import validation
from ._unroll import Point, Unroll

METHODS = ("cg", "minres", "neumann", "dense")
DENSE_LIMIT = 20_000            # elements of θ above which a dense Hessian is refused


@dataclass(frozen=True)
class Implicit:
    """How ``GimliSolver(mode="implicit")`` solves (H + δI) v = ∇_θ L^val at the inner
    loop's end.

    Args:
        method: ``"cg"`` (conjugate gradients, default; H + δI positive definite),
            ``"minres"`` (minimum residual; H + δI symmetric, possibly indefinite),
            ``"neumann"`` (a truncated Neumann series) or ``"dense"`` (the Hessian formed
            and solved exactly: small problems, tests).
        iterations: the most Hessian-vector products the solve may use (CG, MINRES,
            Neumann).
        tol: CG and MINRES stop once the relative residual ‖(H + δI)v − b‖/‖b‖ is below it
            (a tol below the dtype's resolution, about 1e-7 in float32, runs every iteration;
            a residual above both it and 1000·eps is reported by a warning).
        damping: δ ≥ 0 added to the Hessian's diagonal (for a non-convex ℓ, whose
            Hessian may be indefinite at θ*; 0 for the exact system).
        proximal: iMAML's λ > 0: the inner loss is ℓ + λ/2·‖θ − θ₀‖², so that θ₀
            (``init=``) has a hypergradient, λv; needs ``init=``.
        step: Neumann's α (default: 1/λ_max of H + δI, by power iteration).
    """

    method: str = "cg"
    iterations: int = 100
    tol: float = 1e-10
    damping: float = 0.0
    proximal: float = 0.0
    step: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Implicit: method must be one of {METHODS}, not {self.method!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"Implicit: iterations must be an int ≥ 1, got {self.iterations!r}")
        for name in ("tol", "damping", "proximal"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Implicit: {name} must be a finite number ≥ 0, got {value!r}")
        if self.step is not None and not (isinstance(self.step, (int, float)) and 0 < self.step < math.inf):
            raise ValueError(f"Implicit: step must be a positive number, got {self.step!r}")
        if self.step is not None and self.method != "neumann":
            raise ValueError("Implicit: step= is the Neumann series' α; it needs method='neumann'")


class ImplicitReport(NamedTuple):
    """How the last implicit solve went (``solver.last_implicit``)."""

    method: str
    products: int           # Hessian-vector products used (columns, for "dense")
    residual: float         # ‖(H + δI)v − b‖ / ‖b‖ of the solution v (0 where b = 0)
    gradient_norm: float    # ‖∇_θ ℓ(θ*)‖: how far the end point is from stationary


class Result(NamedTuple):
    grads: dict[int, Tensor]        # id(φ^loss leaf) -> its hypergradient; θ₀ as B0
    B0: list[Tensor] | None         # θ₀'s hypergradient (init= with proximal), per tensor
    val_loss: float
    final: Point
    reached: list[bool]
    report: ImplicitReport


def why_not(meta: Any, implicit: Implicit) -> str:
    """Why these meta-parameters have no implicit hypergradient, or ''."""
    if meta.granularity:
        return (f"mode='implicit' differentiates the inner loop's end point, a stationary point "
                f"of the training loss, which does not depend on the optimizer's "
                f"hyperparameters ({', '.join(sorted(meta.granularity))}): they have no implicit "
                f"hypergradient. Differentiate the path instead: mode='reverse' or 'forward'")
    if meta.init is not None and implicit.proximal <= 0:
        return ("mode='implicit' with init=: the end point of an inner loop run to convergence "
                "does not depend on where it started, unless the inner loss holds it near θ₀; "
                "give iMAML's proximal term, implicit=gimli.Implicit(proximal=λ) with λ > 0")
    if meta.init is None and implicit.proximal > 0:
        return ("Implicit(proximal=λ) is iMAML's term λ/2·‖θ − θ₀‖² toward the meta-learned "
                "initial weights: it needs MetaParams(init=model)")
    return ""


def implicit_hypergradient(problem: Problem, unroll: Unroll, leaves: list[Tensor], val_batch: Any,
                           implicit: Implicit) -> Result:
    """Run the inner loop to its end θ_J, then the implicit hypergradient there of every
    φ^loss leaf (and of θ₀ under iMAML's proximal term)."""
    final = unroll.advance(0, unroll.start, unroll.J)          # the user's optimizer, no graph
    unroll.check(final)
    val, b, direct, reached = validation(problem, unroll, final, leaves, val_batch)
    unroll.rng.mark_end()
    trained = [i for i, t in enumerate(unroll.trained) if t]
    every = [t.detach().requires_grad_(stepped) for t, stepped in zip(final.theta, unroll.trained)]
    theta = [every[i] for i in trained]         # θ_J: what the Hessian is taken in
    anchors = [problem.inner.params[i] for i in trained] if problem.proximal else []
    loss = problem.train_loss(every, {k: v.clone() for k, v in final.buffers.items()},
                              unroll.batches[-1])
    G = [torch.zeros_like(t) if g is None else g
         for g, t in zip(grad_of(loss, theta, create_graph=True), theta)]
    gradient_norm = float(torch._C._nn.flatten_dense_tensors([g.detach() for g in G]).norm())

    live = [k for k, g in enumerate(G) if g.requires_grad]      # (else ℓ is linear in θ there)

    def hvp(v: Tensor) -> Tensor:
        """(H + δI)·v, v flat; a batch of them along the first dimension if v is 2-D."""
        batched = v.dim() == 2
        parts = [x.view(v.shape[0], *t.shape) if batched else x.view_as(t)
                 for x, t in zip(v.split([t.numel() for t in theta], dim=-1), theta)]
        found = torch.autograd.grad([G[k] for k in live], theta, [parts[k] for k in live],
                                    retain_graph=True, allow_unused=True, is_grads_batched=batched) \
            if live else [None] * len(theta)
        h = torch.cat([(torch.zeros_like(p) if f is None else f).reshape(*v.shape[:-1], -1)
                       for f, p in zip(found, parts)], dim=-1)
        return h + implicit.damping * v if implicit.damping else h

    rhs = torch._C._nn.flatten_dense_tensors([b[i] for i in trained]).detach()
    v, products, residual = _solve(hvp, rhs, implicit)
    # the mixed term ∇_φ⟨g, v⟩, for the φ^loss leaves and θ₀ (the proximal anchors)
    targets = leaves + anchors
    pairs = [(g, x) for g, x in zip(G, torch._C._nn.unflatten_dense_tensors(v, theta)) if g.requires_grad]
    mixed: list[Tensor | None] = grad_of([g for g, _ in pairs], targets, [x for _, x in pairs]) \
        if pairs and targets else [None] * len(targets)
    unroll.rng.restore_end()
    grads: dict[int, Tensor] = {}
    for k, (leaf, d, m) in enumerate(zip(leaves, direct, mixed[:len(leaves)])):
        grads[id(leaf)] = d if m is None else d - m
        reached[k] = reached[k] or m is not None
    B0 = None
    if anchors:
        B0 = [torch.zeros_like(p) for p in problem.inner.params]
        for i, m in zip(trained, mixed[len(leaves):]):
            if m is not None:
                B0[i] = -m
    report = ImplicitReport(implicit.method, products, residual, gradient_norm)
    return Result(grads, B0, val.item(), final, reached, report)


def _solve(hvp: Callable[[Tensor], Tensor], b: Tensor, implicit: Implicit) -> tuple[Tensor, int, float]:
    """(v, Hessian-vector products used, relative residual) for (H + δI) v = b."""
    norm_b = float(b.norm())
    if norm_b == 0:
        return torch.zeros_like(b), 0, 0.0
    if implicit.method == "dense":
        v, products = _dense(hvp, b), b.numel()
    elif implicit.method == "cg":
        v, products = _cg(hvp, b, implicit, norm_b)
    elif implicit.method == "minres":
        v, products = _minres(hvp, b, implicit, norm_b)
    else:
        v, products = _neumann(hvp, b, implicit)
    residual = float((hvp(v) - b).norm()) / norm_b
    return v, products + 1, residual


def _cg(hvp: Callable[[Tensor], Tensor], b: Tensor, implicit: Implicit, norm_b: float) -> tuple[Tensor, int]:
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    products = 0
    while products < implicit.iterations and math.sqrt(rs) > implicit.tol * norm_b:
        Ap = hvp(p)
        products += 1
        curvature = float(p @ Ap)
        if not curvature > 0:
            raise ValueError(f"mode='implicit', method='cg': the Hessian of the training loss at the "
                             f"inner loop's end (plus damping={implicit.damping:g}) is not positive "
                             f"definite (pᵀHp = {curvature:.3g} along a CG direction): ℓ is not convex "
                             f"there, or the inner loop has not reached a minimum. Use "
                             f"method='minres' (any symmetric system), raise damping=, or train the "
                             f"inner loop longer")
        alpha = rs / curvature
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        new = float(r @ r)
        p.mul_(new / rs).add_(r)
        rs = new
    return x, products


def _minres(hvp: Callable[[Tensor], Tensor], b: Tensor, implicit: Implicit,
            norm_b: float) -> tuple[Tensor, int]:
    """MINRES without a preconditioner: the Lanczos vectors of H + δI from b, and the
    iterate minimizing the residual over their span, updated by Givens rotations."""
    x = torch.zeros_like(b)
    r1 = r2 = y = b                                     # (never changed in place)
    beta, old_beta = norm_b, 0.0
    dbar = epsilon = 0.0
    phibar, cs, sn = norm_b, -1.0, 0.0
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    products = 0
    while products < implicit.iterations and phibar > implicit.tol * norm_b and beta > 0:
        v = y / beta                                    # the next Lanczos vector
        y = hvp(v)
        products += 1
        if products > 1:
            y = y - (beta / old_beta) * r1
        alpha = float(v @ y)
        y = y - (alpha / beta) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, float(y.norm())
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha                  # the previous rotation, applied
        gbar = sn * dbar - cs * alpha
        epsilon, dbar = sn * beta, -cs * beta
        gamma = max(math.hypot(gbar, beta), torch.finfo(b.dtype).tiny)
        cs, sn = gbar / gamma, beta / gamma             # the new rotation
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - old_epsilon * w1 - delta * w2) / gamma
        x = x + phi * w
    return x, products


def _neumann(hvp: Callable[[Tensor], Tensor], b: Tensor, implicit: Implicit) -> tuple[Tensor, int]:
    products = 0
    alpha = implicit.step
    if alpha is None:                   # 1/λ_max by power iteration, from a fixed start
        gen = torch.Generator(device=b.device).manual_seed(0)
        x = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
        top = 0.0
        for _ in range(20):
            x = x / x.norm()
            Ax = hvp(x)
            products += 1
            top = float(x @ Ax)
            x = Ax
        if not top > 0:
            raise ValueError("mode='implicit', method='neumann': the Hessian's largest eigenvalue "
                             f"estimate is {top:.3g} ≤ 0; the series cannot converge (raise damping=)")
        alpha = 1.0 / top
    term = b.clone()
    total = b.clone()
    for _ in range(implicit.iterations - 1):
        term = term - alpha * hvp(term)
        products += 1
        total += term
    return alpha * total, products


def _dense(hvp: Callable[[Tensor], Tensor], b: Tensor) -> Tensor:
    n = b.numel()
    if n > DENSE_LIMIT:
        raise ValueError(f"mode='implicit', method='dense' forms the {n}×{n} Hessian; above "
                         f"{DENSE_LIMIT} parameters use method='cg'")
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    H = torch.cat([hvp(eye[k:k + 256]) for k in range(0, n, 256)])     # rows: H is symmetric
    return torch.linalg.solve(H.T, b)
