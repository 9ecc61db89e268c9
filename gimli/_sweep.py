"""The reverse sweep, Algorithm 1 lines 8–15, with the optimizer-state adjoint.

Reads top to bottom like the algorithm (docs/design.md §2; proofs/sweep.md):

    B_J = ∇L^val(θ'_J),  S_J = 0
    for j = J−1 … 0:
        (b_j, S_j, o_j, a_j) = VJP of opt_j at (θ'_j, σ_j, G_j) applied to (B_{j+1}, S_{j+1})
        (h_j, m_j) = ∇_(θ'_j, φ^loss) ⟨o_j, G_j⟩          one double-backward call
        A^opt += a_j;  A^loss += m_j;  B_j = b_j + h_j

``first_order`` drops h_j (B_j = b_j; a_j and m_j stay exact); a truncated
unroll stops at j = J − K and reports B_0 = 0 (θ₀'s path is cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from ._problem import Problem, grad_of, values_only
from ._schedule import Schedule
from ._unroll import Point, Step, Unroll, add_note, describe_batch
from .optim._rule import ElementSums, Flat, Laid, Segments, listed


class Sweep(NamedTuple):
    B0: list[Tensor]                            # ∂L^val/∂θ'_0 (θ₀'s hypergradient in MAML)
    A_opt: dict[str, list[Tensor]]              # per tensor, each hyperparameter's shape there
    A_loss: list[Tensor]                        # aligned with problem.loss_leaves()
    val_loss: float
    final: Point                                # (θ'_J, σ_J, buffers), for a commit
    reached: list[bool]                         # per φ^loss leaf: reaches some G_j or L^val
    # a hyperparameter learned per step: each step's a_j (None for a step not swept)
    A_step: dict[str, list[list[Tensor | None] | None]] = {}


def _zeros_like_state(state: Any) -> Any:
    return type(state)(*([torch.zeros_like(x) if isinstance(x, Tensor) else None for x in field]
                         for field in state))


def _accumulate(totals: list[Tensor], terms: Sequence[Tensor | None]) -> None:
    """totals[i] += terms[i] where a term exists, in place (one foreach call): the totals
    are the sweep's own tensors. A total that cannot take an in-place add (a broadcast
    view, or a term of a wider dtype) is replaced by the sum."""
    flat = totals.flat if isinstance(totals, Laid) else None
    if flat is not None and len(terms) == len(totals) and flat.is_contiguous() and not flat.requires_grad and \
            all(t is not None and t.dtype == flat.dtype for t in terms):
        torch._foreach_add_(totals, cast(list[Tensor], terms))      # (views of one flat tensor)
        return
    pairs = [(i, t) for i, t in enumerate(terms) if t is not None]
    fit = [(i, t) for i, t in pairs if totals[i].is_contiguous()
           and t.dtype == totals[i].dtype and t.shape == totals[i].shape
           and not totals[i].requires_grad]
    if fit:
        torch._foreach_add_([totals[i] for i, _ in fit], [t for _, t in fit])
    done = {i for i, _ in fit}
    for i, t in pairs:
        if i not in done:
            totals[i] = totals[i] + t


def _add_hvp(B: Any, terms: Sequence[Tensor | None]) -> Any:
    """B_j = b_j + h_j (line 14), in place in b_j (the sweep's own). A b_j left flat
    (``Flat``) takes h_j joined, one addition, and stays flat for the next step's VJP;
    split where some tensor has no h_j or another dtype."""
    if isinstance(B, Flat):
        if not terms:
            return B
        if all(t is not None and t.dtype == B.values.dtype for t in terms):
            h = cast(list[Tensor], list(terms))     # (the engine's own tensors: never laid out)
            B.values.add_(h[0].reshape(-1) if len(h) == 1 else torch._C._nn.flatten_dense_tensors(h))
            return B
        B = B.split()
    _accumulate(B, terms)
    return B


def _add_per_element(totals: dict[tuple[str, Segments], Tensor], name: str, term: ElementSums) -> None:
    """The total of ``name`` over the tensors laid out as ``term``'s, += term, per element
    (in place, in the sweep's own tensor; summed per tensor after the sweep)."""
    key = (name, term.segments)
    if key not in totals:
        totals[key] = torch.zeros(term.segments.total, dtype=term.flat.dtype, device=term.segments.device)
    totals[key].add_(term.flat)


def _or_zeros(grads: Sequence[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def validation(problem: Problem, unroll: Unroll, final: Point, leaves: list[Tensor],
               val_batch: Any) -> tuple[Tensor, list[Tensor], list[Tensor], list[bool]]:
    """L^val(θ'_J), its gradient w.r.t. θ'_J and its direct gradient w.r.t. each φ^loss
    leaf (zeros where it does not read one), and which leaves it reads."""
    n = len(final.theta)
    theta_J = [t.detach().requires_grad_(trained) for t, trained in zip(final.theta, unroll.trained)]
    val_buffers = {k: b.clone() for k, b in final.buffers.items()}    # σ_J's buffers stay as J steps
    try:
        val = problem.val_loss(theta_J, val_buffers, val_batch)         # left them (for a commit)
    except Exception as e:
        add_note(e, f"(raised by the validation loss on val_batch, {describe_batch(val_batch)}; val_batch "
                 f"is one batch, where train_batches is a list of them)")
        raise
    direct = grad_of(val, theta_J + leaves) if val.requires_grad else [None] * (n + len(leaves))
    if all(d is None for d in direct[:n]):
        raise ValueError("the validation loss does not depend on the model's parameters θ'_J, so "
                         "no meta-parameter can change it through the unroll (Requirement I of the "
                         "paper: ∇_θ L^val must exist); check val_loss_fn (is it computed under "
                         "torch.no_grad(), or from detached outputs?)")
    return (val, _or_zeros(direct[:n], theta_J), _or_zeros(direct[n:], leaves),
            [d is not None for d in direct[n:]])


def sweep(problem: Problem, unroll: Unroll, need: frozenset[str], leaves: list[Tensor],
          schedule: Schedule | None, val_batch: Any, *, first_order: bool = False) -> Sweep:
    """The hypergradient pieces for the hyperparameters ``need`` (φ^opt) and the
    leaves of φ^loss, over the unroll's steps in reverse order."""
    inner = problem.inner
    n = len(inner.params)
    steps = unroll.reversed()
    final = next(steps)
    assert isinstance(final, Point)
    # line 8: A^opt ← 0, A^loss ← 0
    stepwise = problem.meta.stepwise() & need
    A_opt = {name: cast(list[Tensor], [None if v is None else torch.zeros_like(v)
                                       for v in unroll.hypers[0][name]])
             for name in need - stepwise}     # (None: a tensor whose optimizer has no such name)
    A_step: dict[str, list[list[Tensor | None] | None]] = {name: [None] * unroll.J for name in stepwise}
    A_loss = [torch.zeros_like(x) for x in leaves]
    # line 9: B_J ← ∇_θ L^val(θ'_J), plus L^val's direct gradient w.r.t. φ^loss; S_J ← 0
    val, B, direct, reached = validation(problem, unroll, final, leaves, val_batch)
    unroll.rng.mark_end()
    A_loss = [a + d for a, d in zip(A_loss, direct)]
    S = _zeros_like_state(final.state)
    after = final.state                         # σ_{j+1}: what step j produced (its VJP reads it)
    targets = n if not first_order else 0       # first-order: no ∇²_θ ℓ term
    # a hyperparameter that is one number per tensor, without a schedule: its a_j added per
    # element over the steps and summed per tensor once, at the end (_add_per_element)
    defer = need - stepwise if schedule is None else frozenset()
    per_element: dict[tuple[str, Segments], Tensor] = {}
    for step in steps:                                          # line 10: j = J−1 … 0
        assert isinstance(step, Step)
        j, theta, G = step.j, step.theta, step.grads
        # line 11–12: o_j = B_{j+1}·O_j and a_j, with b_j and S_j, from the optimizer's VJP
        with values_only():                                     # (θ'_j and G_j read as values)
            out = inner.vjp(theta, step.state, G, unroll.hypers[j], B, S, need, after=after, defer=defer,
                            flat=True)
        for name in need:                                       # line 12: A^opt += a_j
            a_j = out.hypers[name]
            if isinstance(a_j, ElementSums):
                _add_per_element(per_element, name, a_j)
                continue
            if schedule is not None:
                a_j = schedule.pull_back(j, name, a_j)
            if name in stepwise:                                # its own entry per step
                A_step[name][j] = [a if a is not None or v is None else torch.zeros_like(v)
                                   for a, v in zip(a_j, unroll.hypers[j][name])]
            else:
                _accumulate(A_opt[name], a_j)
        # lines 13–14: (h_j, m_j) = ∇_(θ'_j, φ^loss) ⟨o_j, G_j⟩, one double-backward call
        inputs = theta[:targets] + leaves
        hm: list[Tensor | None] = [None] * len(inputs)
        pairs = [(g, o) for g, o in zip(G, out.grads)
                 if g is not None and o is not None and g.requires_grad]
        if pairs and inputs:                                    # (else ℓ is linear in θ)
            hm = grad_of([g for g, _ in pairs], inputs, [o for _, o in pairs])
        if leaves:                                              # line 13: A^loss += m_j
            _accumulate(A_loss, hm[targets:])
            reached = [r or m is not None for r, m in zip(reached, hm[targets:])]
        B = _add_hvp(out.params, hm[:targets])                                  # line 14
        S = out.state
        after = step.state
    for (name, segments), total in per_element.items():
        _accumulate(A_opt[name], segments.sums(total))
    B = listed(B)
    if unroll.first > 0:                        # truncated: θ₀'s path is cut at J − K
        B = [torch.zeros_like(b) for b in B]
    return Sweep(B, A_opt, A_loss, val.item(), final, reached, A_step)
