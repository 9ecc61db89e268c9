"""Is my hypergradient right? ``gimli.check`` answers it for the user's own setup.

On a copy of the user's model, optimizer, scheduler and meta-parameters (in
float64 by default), it computes the engine's hypergradient and compares it,
per meta-parameter, with two independent references:

* the full autograd unroll (``_oracle.py``): the same losses and optimizer
  steps differentiated end to end by autograd;
* central finite differences of the validation loss after the unroll, with
  Richardson extrapolation (error O(h⁴)), on a few elements of each
  meta-parameter (the largest by the autograd reference, then random ones).

Nothing of the user's is changed: not the model, its buffers or gradients, the
optimizer or its state, the meta-parameters, nor the global random-number state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ._oracle import full_unroll_hypergradient
from ._unroll import Point, Unroll

if TYPE_CHECKING:
    from ._solver import GimliSolver


class ParamCheck(NamedTuple):
    """One meta-parameter's verdict."""

    name: str
    autograd_error: float       # max |g − g_ad| / max |g_ad| over the whole tensor
    fd_error: float             # over the checked elements: max |g_i − fd_i| / max |fd|; nan if none
    elements: int               # elements checked by finite differences
    zero: bool                  # the autograd reference is identically zero
    passed: bool


class CheckReport(NamedTuple):
    params: list[ParamCheck]
    rtol: float
    fd_rtol: float
    dtype: torch.dtype

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.params)

    def __str__(self) -> str:
        def fmt(e: float) -> str:
            return "—" if math.isnan(e) else f"{e:.1e}"

        rows = [("meta-parameter", "vs autograd", "vs finite diff.", "verdict")]
        for p in self.params:
            verdict = ("pass" if p.passed else "FAIL") + (" (zero hypergradient)" if p.zero else "")
            rows.append((p.name, fmt(p.autograd_error), f"{fmt(p.fd_error)} ({p.elements})", verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: relative tolerance {self.rtol:.0e} against "
                     f"the autograd unroll, {self.fd_rtol:.0e} against finite differences ({self.dtype})")
        return "\n".join(lines)


def check(solver: GimliSolver, train_batches: Sequence[Any], val_batch: Any, *,
          dtype: torch.dtype | None = torch.float64, finite_differences: bool = True,
          elements: int = 4, rtol: float = 1e-8, fd_rtol: float = 1e-5, seed: int = 0) -> CheckReport:
    """Compare the solver's hypergradient with the full autograd unroll and with
    finite differences, per meta-parameter, on a copy (nothing of the user's changes).

    Args:
        solver: the user's solver (its model, optimizer, scheduler, meta-parameters,
            losses, memory mode, ``first_order``/``truncate``).
        train_batches, val_batch: a few batches, as for :meth:`GimliSolver.hypergradient`.
        dtype: the floating dtype the copy computes in (``None``: as they are).
            Floating tensors in the batches are converted too.
        finite_differences: also compare with central finite differences (Richardson)
            of the unroll's validation loss on ``elements`` entries per meta-parameter.
            Not meaningful with ``first_order`` or ``truncate``, whose hypergradients are
            deliberately not the loss's derivative; then skipped.
        rtol: tolerance against the autograd unroll (both exact: rounding only).
        fd_rtol: tolerance against finite differences (their own error is ~1e-8 in float64
            where the unroll is smooth; a ReLU kink or a max within h of the point breaks it).
        seed: the random-number state every evaluation starts from (dropout masks).
    """
    rng = torch.get_rng_state()
    try:
        twin = _twin(solver, dtype)
        batches: list[Any] = _cast(list(train_batches), dtype)
        val_batch = _cast(val_batch, dtype)
        torch.manual_seed(seed)
        ours = twin.hypergradient(batches, val_batch)
        torch.manual_seed(seed)
        reference = full_unroll_hypergradient(twin, batches, val_batch)
        exact = twin.truncate is None and not twin.first_order
        gen = torch.Generator().manual_seed(seed)
        params = []
        for name, p in twin.meta.named_parameters():
            g, ref = ours[name], reference[name]
            ad_error = _relative(g, ref)
            fd_error, count = float("nan"), 0
            if finite_differences and exact and elements > 0:
                idx = _elements(ref, elements, gen)
                fd = torch.tensor([_derivative(twin, p, i, batches, val_batch, seed) for i in idx],
                                  dtype=torch.float64)
                fd_error, count = _relative(g.detach().reshape(-1)[idx].double(), fd), len(idx)
            passed = ad_error <= rtol and (count == 0 or fd_error <= fd_rtol)
            params.append(ParamCheck(name, ad_error, fd_error, count, not bool(ref.any()), passed))
    finally:
        torch.set_rng_state(rng)
    return CheckReport(params, rtol, fd_rtol, dtype or next(iter(ours.values())).dtype)


def assert_hypergradients_correct(solver: GimliSolver, train_batches: Sequence[Any], val_batch: Any,
                                  **kwargs: Any) -> CheckReport:
    """:func:`check`, raising ``AssertionError`` with the report's table when a
    meta-parameter fails; for the user's own pytest tests."""
    report = check(solver, train_batches, val_batch, **kwargs)
    if not report.passed:
        raise AssertionError("gimli.check: hypergradients disagree\n" + str(report))
    return report


# --- the copy ---------------------------------------------------------------------------
def _twin(solver: GimliSolver, dtype: torch.dtype | None) -> GimliSolver:
    """A solver over deep copies of the user's objects, copied together so that the
    copied optimizer holds the copied model's parameters."""
    from ._solver import GimliSolver

    problem = solver.problem
    model, opt, meta, scheduler = copy.deepcopy(
        (problem.module, problem.inner.torch_optimizer, solver.meta, problem.scheduler))
    if dtype is not None:
        model.to(dtype)             # in place: the optimizer's param_groups still hold them
        meta.to(dtype)
        for group in opt.param_groups:      # a learned optimizer's network
            for value in group.values():
                if isinstance(value, torch.nn.Module):
                    value.to(dtype)
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                    state[key] = value.to(dtype)
    return GimliSolver(model, problem.loss_fn, opt, meta, val_loss_fn=problem.val_loss_fn,
                       scheduler=scheduler, memory=solver.memory, snapshots=solver.snapshots,
                       first_order=solver.first_order, truncate=solver.truncate)


def _cast(batch: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        items = [_cast(b, dtype) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch


# --- finite differences -----------------------------------------------------------------
def _relative(got: Tensor, want: Tensor) -> float:
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _elements(ref: Tensor, k: int, gen: torch.Generator) -> list[int]:
    """The k largest entries of the reference, then random others, up to k in all."""
    flat = ref.detach().abs().reshape(-1)
    k = min(k, flat.numel())
    largest = torch.topk(flat, (k + 1) // 2).indices.tolist()
    rest = [i for i in torch.randperm(flat.numel(), generator=gen).tolist() if i not in largest]
    return largest + rest[:k - len(largest)]


def _derivative(solver: GimliSolver, p: Tensor, i: int, train_batches: list[Any], val_batch: Any,
                seed: int) -> float:
    """∂L^val/∂p_i by central differences at h and h/2, Richardson-extrapolated."""
    x = float(p.detach().reshape(-1)[i])
    h = 1e-5 * max(abs(x), 1e-2)     # small: a β₂ of 0.999 is 1e-3 from where Adam breaks

    def f(value: float) -> float:
        with torch.no_grad():
            p.view(-1)[i] = value
        try:
            return _val_loss(solver, train_batches, val_batch, seed)
        finally:
            with torch.no_grad():
                p.view(-1)[i] = x

    def central(step: float) -> float:
        return (f(x + step) - f(x - step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


def _val_loss(solver: GimliSolver, train_batches: list[Any], val_batch: Any, seed: int) -> float:
    """L^val(θ'_J) after the unroll, with no graphs (the forward pass only)."""
    torch.manual_seed(seed)
    problem = solver.problem
    hypers = problem.split(len(train_batches)).per_step(len(train_batches))
    with torch.enable_grad():
        run = Unroll(problem, hypers, train_batches, memory="recompute", graph=False)
        final = run.advance(0, run.start, run.J)
        assert isinstance(final, Point)
        return float(problem.val_loss(final.theta, final.buffers, val_batch).detach())
