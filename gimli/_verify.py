"""Is my hypergradient right? ``gimli.check`` answers it for the user's own setup.

On a copy of the user's model, optimizer, scheduler and meta-parameters (in
float64 by default), it computes the engine's hypergradient and compares it,
per meta-parameter, with two independent references:

* the full autograd unroll (``_oracle.py``): the same losses and optimizer
  steps differentiated end to end by autograd;
* central finite differences of the validation loss after the unroll, with
  Richardson extrapolation (error O(h⁴)), on a few elements of each
  meta-parameter (the largest, then random ones). With ``first_order`` or
  ``truncate`` they difference the same stopped function the hypergradient is
  the derivative of: each G_j evaluated on the unperturbed trajectory, or the
  first J − K steps held at their unperturbed values.

The checker must never call a correct result wrong, nor a wrong one right.
Four things stand between an exact hypergradient and its references:

1. Rounding, where the hypergradient cancels to (near) zero: both exact values
   are then rounding noise, and a plain relative error is 1 or ∞. Every error is
   therefore relative to max(|reference|, floor), with the floor

       floor_p = ρ · |L^val| / s_p,     s_p = max(max_i |φ_p,i|, 10⁻²),

   the hypergradient that would move L^val by ρ·|L^val| when φ_p moves by its own
   size (ρ = ``floor``, 10⁻⁴ by default): below it, φ_p does not matter at the
   problem's scale. Against the autograd unroll the allowance is then
   rtol·floor_p = 10⁻¹²·|L^val|/s_p, well above the rounding of either value (over
   our stress runs the two stayed within 4·10⁻¹¹ of max(|reference|, floor_p),
   BatchNorm under Adam the worst).
   rtol itself is never below 10⁶·ε of the dtype computed in: in float64 that is
   2·10⁻¹⁰ and changes nothing; in float32 (``dtype=None`` on a float32 model) two
   exact unrolls differ by up to ~10⁻⁴, and only a gross error can be told.

   Rounding the unroll amplifies: computed in floating point, an exact hypergradient
   entry is off by about ε·‖∇_θ L^val(θ_J)‖·‖∂θ_J/∂φ_i‖, ε times the size of the
   terms it sums. That is negligible unless the unroll is itself ill-conditioned in
   φ_i: Adam-like optimizers in their eps regime with a coupled weight decay λ
   multiply a zero bias's perturbation by about 1 − lr·λ/eps per step, and a bias
   feeding BatchNorm (true hypergradient 0) then carries rounding noise amplified by
   (lr·λ/eps)^J. So R_p = 100·ε·‖∇_θ L^val‖·max_i ‖∂θ_J/∂φ_p,i‖ is added to both
   allowances (2·R_p against autograd, whose value carries its own), the column
   norms estimated by gimli's own sweep on two random linear functionals w·θ_J
   (E|(Jᵀw)_i|² = ‖J e_i‖²; closed-form VJPs, finite where autograd's are NaN).
   The gap we measured stayed below 1·ε·‖∇L‖·‖J‖; 100 is the margin. Where R_p
   exceeds the tolerance the report says "rounding ±R_p": no computation in this
   dtype defines that hypergradient more closely.
2. Rounding of L^val itself, in finite differences (step h = 10⁻⁵·max(|x|, 10⁻²),
   at most |x|/2 so that x ± h keeps its sign, and half the way to the end of a
   hyperparameter's range): an evaluation is off by δ ≤ κ·ε·|L^val| (ε the dtype's
   epsilon, κ = 64 for the rounding the unroll accumulates; we measured up to 8), so
   the Richardson estimate (4·D(h/2) − D(h))/3 carries up to 3δ/h of noise. That,
   plus twice the estimate's measured inconsistency (below), is its error bar: an
   element passes within fd_rtol of the scale or within its error bar.
3. Non-smoothness (a ReLU, a max, Rprop's sign) within h of the point: there finite
   differences need not agree with the exact derivative. A smooth L^val has
   |D(h) − D(h/2)| = O(h²) and |S(h) − 4·S(h/2)|/h = O(h³), S(h) the second difference
   f(x+h) − 2f(x) + f(x−h); a kink within h makes one of them O(jump), and bounds the
   estimate's error by their maximum (one kink: 7/6 of it). Where they exceed half
   the tolerance (or the rounding noise they carry), the element is tried again with
   h/16, h/256 and h/4096 (a kink at distance d is out of reach once h < d; so is a
   curvature that is merely fast). At each of those step sizes L^val may instead have
   a kink at the point itself (a ReLU at exactly 0): one-sided differences
   (Richardson on f(x ± t) − f(x), t = h, h/2, h/4, smooth on a side where their two
   extrapolations agree) give the derivative on each side. There autograd's
   conventions need not pick either side (ReLU'(0) = 0 for every sample at 0 at
   once; a tie of max or clamp takes the mean of both), so a smooth side that agrees
   with the hypergradient confirms it, and so does a value between the two smooth
   sides (a derivative at the kink); none refutes it: an element where no step size
   is smooth and no side agrees is skipped. A hypergradient can thus escape finite differences only at an element
   where L^val itself is not smooth down to h/4096 (found from L^val alone). The
   report counts the skipped (and the one-sided) elements, and replaces skipped ones
   with others. A hyperparameter held directly by its meta-parameter
   (``transform="project"``) is perturbed only inside its valid range; on an end of
   it (a weight decay of 0) the derivative is the one-sided one into the range, what
   gimli and autograd compute (the range's clamp passes the gradient at its ends;
   outside, L^val is flat), and it is judged like a central one.
4. √0 under Adam-like optimizers: at a dead unit autograd's √ backward gives
   0·∞ = NaN, while gimli's closed-form VJPs take the true limit. Where the
   autograd reference is not finite the comparison means nothing: the report says
   "autograd NaN" and those entries are judged by finite differences alone, on
   twice as many elements, chosen among them. A non-finite hypergradient from gimli
   always fails.

An optimizer that rounds inside its step below the unroll's precision, and is
differentiated straight through (Muon's bfloat16 Newton–Schulz iteration), makes
L^val a staircase at that scale: its finite differences are not the derivative
gimli (or autograd, through the same step) computes, so they are not used; the
report says why.

A meta-parameter fails when a reference disagrees beyond its tolerance (or gimli's
value is not finite), and passes otherwise. It is marked "unverified" when some of
its entries have no usable reference: the autograd reference is not finite there and
finite differences are off or found L^val differentiable at none of the elements
tried (every one a kink). That is reported, not failed: no reference disagrees, and
where L^val is not differentiable there is no derivative to disagree with
(``CheckReport.verified`` is False).

The copy computes locally (``distributed=False``): under an initialized
torch.distributed process group the check compares this process's own
hypergradient, on the batches it is given, and communicates with no other rank.
It computes in ``dtype`` throughout (the default dtype is set to it, or to the
model's with ``dtype=None``, while it runs: NAdam's and ASGD's scalars, which
``torch.optim`` keeps in the default dtype, are then not rounded to float32 in a
float64 unroll, where finite differences would see the rounding's steps), and the
warnings the user's own solver gives (``GimliWarning``) are not repeated.

Nothing of the user's is changed: not the model, its buffers or gradients, the
optimizer or its state, the meta-parameters, the default dtype, nor the global
random-number state.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ._oracle import full_unroll_hypergradient
from ._problem import GimliWarning
from ._unroll import Point, Unroll
from .optim import bind
from .optim._core import Interval

if TYPE_CHECKING:
    from ._solver import GimliSolver

KAPPA = 64              # δ ≤ κ·ε·|L^val|: the rounding of one evaluation of L^val
H_REL = 1e-5            # the finite-difference step, relative to max(|φ_i|, 10⁻²)
ROUNDING = 1e6         # rtol is at least ROUNDING·ε of the dtype the copy computes in
AMPLIFIED = 100         # R_p = AMPLIFIED·ε·‖∇_θ L^val‖·max_i ‖∂θ_J/∂φ_p,i‖
PROBES = 2              # random linear functionals of θ_J that estimate ‖∂θ_J/∂φ_p,i‖
RETRY = 16              # a non-smooth element is tried again with h / RETRY, …
LEVELS = 4              # … down to h / RETRY³


class ParamCheck(NamedTuple):
    """One meta-parameter's verdict."""

    name: str
    autograd_error: float       # max |g − g_ad| / max(max |g_ad|, floor) where g_ad is finite;
                                # nan if nowhere
    fd_error: float             # max over the checked elements of |g_i − fd_i| / max(max |fd|, floor,
                                # fd_i's error bar / fd_rtol); nan if none
    elements: int               # elements checked by finite differences
    zero: bool                  # the hypergradient is zero to within the autograd allowance
    passed: bool                # no reference disagrees (status "pass" or "unverified")
    nonfinite: int = 0          # entries where the autograd reference is NaN or ±∞
    skipped: int = 0            # elements where L^val is smooth at no step size: not judged
    one_sided: int = 0          # elements judged by one-sided differences (a kink at the point)
    floor: float = 0.0          # floor_p, in the hypergradient's units
    status: str = "pass"        # "pass", "FAIL" or "unverified"
    rounding: float = 0.0       # R_p: how far rounding the unroll amplifies can move an exact value
    limited: bool = False       # R_p exceeds the tolerance: checked only to within ±R_p


class CheckReport(NamedTuple):
    params: list[ParamCheck]
    rtol: float
    fd_rtol: float
    dtype: torch.dtype
    no_fd: str = ""             # why finite differences were not used, if they were asked for

    @property
    def passed(self) -> bool:
        """No meta-parameter fails."""
        return all(p.passed for p in self.params)

    @property
    def verified(self) -> bool:
        """Every meta-parameter passed with a reference for each of its entries."""
        return all(p.status == "pass" for p in self.params)

    def __str__(self) -> str:
        def fmt(e: float) -> str:
            return "—" if math.isnan(e) else f"{e:.1e}"

        rows = [("meta-parameter", "vs autograd", "vs finite diff.", "verdict")]
        for p in self.params:
            autograd = fmt(p.autograd_error)
            if p.nonfinite:
                autograd = "autograd NaN" if math.isnan(p.autograd_error) else f"{autograd}, {p.nonfinite} NaN"
            counts = [f"{p.one_sided} one-sided"] * bool(p.one_sided) + [f"{p.skipped} kink"] * bool(p.skipped)
            fd = f"{fmt(p.fd_error)} ({', '.join([str(p.elements)] + counts)})"
            notes = ["zero hypergradient"] * p.zero + [f"rounding ±{p.rounding:.0e}"] * p.limited
            verdict = p.status + (f" ({'; '.join(notes)})" if notes else "")
            rows.append((p.name, autograd, fd, verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        unverified = [p.name for p in self.params if p.status == "unverified"]
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: relative tolerance {self.rtol:.0e} against "
                     f"the autograd unroll, {self.fd_rtol:.0e} against finite differences ({self.dtype})"
                     + (f"; unverified: {', '.join(unverified)}" if unverified else ""))
        if any(p.nonfinite for p in self.params):
            lines.append("autograd NaN: the autograd reference is not finite there (√ of 0 at a dead "
                         "unit: 0·∞); those entries are judged by finite differences alone")
        if self.no_fd:
            lines.append(f"no finite differences: {self.no_fd}")
        if any(p.limited for p in self.params):
            lines.append("rounding ±R: the unroll amplifies rounding in that hypergradient (‖∂θ_J/∂φ‖ "
                         "is large), so an exact value is only defined to within ±R, and checked to that")
        if any(p.one_sided or p.skipped for p in self.params):
            lines.append("one-sided: L^val has a kink at the point, judged by a one-sided derivative "
                         "(or by lying between the two); kink: smooth on no side within the "
                         "finite-difference step, not judged")
        return "\n".join(lines)


def check(solver: GimliSolver, train_batches: Sequence[Any], val_batch: Any, *,
          dtype: torch.dtype | None = torch.float64, finite_differences: bool = True,
          elements: int = 4, rtol: float = 1e-8, fd_rtol: float = 1e-5, floor: float = 1e-4,
          seed: int = 0) -> CheckReport:
    """Compare the solver's hypergradient with the full autograd unroll and with
    finite differences, per meta-parameter, on a copy (nothing of the user's changes).

    Errors are relative to ``max(|reference|, floor_p)``, ``floor_p = floor·|L^val|/s_p``
    with ``s_p = max(max |φ_p|, 10⁻²)``; finite differences also allow for their own error
    (rounding of L^val, measured truncation), shrink their step or go one-sided where
    L^val is not smooth, and skip elements where nothing is; where the autograd
    reference is not finite (√0 at a dead unit under Adam-like optimizers) the entries
    are judged by finite differences alone; a non-finite hypergradient always fails.
    The module docstring derives each of these. Meta-parameters with
    ``requires_grad=False`` (constants) have no hypergradient and no row.
    The copy computes locally: under torch.distributed it checks this process's own
    hypergradient on these batches and communicates with no other rank.

    Args:
        solver: the user's solver (its model, optimizer, scheduler, meta-parameters,
            losses, memory mode, forward or reverse mode, ``first_order``/``truncate``;
            with ``horizon="full"``, the hypergradient over these batches alone, without
            the tangents it carries).
        train_batches, val_batch: a few batches, as for :meth:`GimliSolver.hypergradient`.
        dtype: the floating dtype the copy computes in (``None``: as they are).
            Floating tensors in the batches are converted too, and the default dtype
            is set to it (or to the model's) while the check runs.
        finite_differences: also compare with central finite differences (Richardson)
            of the unroll's validation loss on ``elements`` entries per meta-parameter.
            With ``first_order`` or ``truncate`` they difference the same stopped
            function (G_j on the unperturbed trajectory; the first J − K steps fixed).
            Not with an optimizer that rounds inside its step below the unroll's
            precision and is differentiated straight through (Muon's bfloat16
            Newton–Schulz): L^val is then a staircase, and the report says so.
        rtol: tolerance against the autograd unroll (both exact: rounding only); at least
            10⁶·ε of the dtype (float64: 2·10⁻¹⁰, no change; float32: 0.12, where two exact
            unrolls can differ by 10⁻⁴ and only a gross error can be told).
        fd_rtol: tolerance against finite differences (whose own error is ~1e-9 in
            float64 where L^val is smooth).
        floor: ρ, the change of L^val, relative to ``|L^val|``, below which a meta-parameter
            moved by its own size counts as not mattering (the floor of every error's scale).
        seed: the random-number state every evaluation starts from (dropout masks).
    """
    if solver.mode == "implicit":
        raise ValueError("gimli.check compares a hypergradient with the derivative of the unrolled "
                         "training (the autograd unroll, finite differences), which an implicit "
                         "hypergradient equals only once the inner loop has converged: check the "
                         "same setup with mode='reverse', and compare the implicit hypergradient "
                         "with it as J grows (solver.last_implicit reports how stationary the end is)")
    rng = torch.get_rng_state()
    default = torch.get_default_dtype()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GimliWarning)   # the user's own solver warns
            computed_in = dtype or solver.problem.inner.params[0].dtype
            if computed_in in (torch.float32, torch.float64):  # NAdam's, ASGD's scalars: not rounded
                torch.set_default_dtype(computed_in)            # below the unroll's precision
            twin = _twin(solver, dtype)
            batches: list[Any] = _cast(list(train_batches), dtype)
            val_batch = _cast(val_batch, dtype)
            torch.manual_seed(seed)
            ours = twin.hypergradient(batches, val_batch)
            torch.manual_seed(seed)
            reference = full_unroll_hypergradient(twin, batches, val_batch)
            objective = _Objective(twin, batches, val_batch, seed)
            rtol = max(rtol, ROUNDING * objective.eps)      # no tighter than the dtype can tell
            spread = _amplification(twin, batches, val_batch, seed)
            no_fd = next((r.straight_through for r in twin.problem.inner.group_rules if r.straight_through),
                         "") if finite_differences else ""
            use_fd = finite_differences and elements > 0 and not no_fd
            gen = torch.Generator().manual_seed(seed)
            params = [_judge(name, p, ours[name], reference[name], objective, use_fd, elements,
                             rtol, fd_rtol, floor, gen, _range(twin.meta, name, p),
                             AMPLIFIED * objective.eps * objective.grad_norm * spread[name])
                      for name, p in twin.meta.named_parameters() if name in ours]   # not frozen ones
    finally:
        torch.set_default_dtype(default)
        torch.set_rng_state(rng)
    return CheckReport(params, rtol, fd_rtol, dtype or next(iter(ours.values())).dtype, no_fd)


def assert_hypergradients_correct(solver: GimliSolver, train_batches: Sequence[Any], val_batch: Any,
                                  **kwargs: Any) -> CheckReport:
    """:func:`check`, raising ``AssertionError`` with the report's table when a
    meta-parameter fails; for the user's own pytest tests."""
    report = check(solver, train_batches, val_batch, **kwargs)
    if not report.passed:
        raise AssertionError("gimli.check: hypergradients disagree\n" + str(report))
    return report


# --- one meta-parameter's verdict ---------------------------------------------------------
def _judge(name: str, p: Tensor, ours: Tensor, reference: Tensor, objective: _Objective, use_fd: bool,
           elements: int, rtol: float, fd_rtol: float, rho: float, gen: torch.Generator,
           bounds: tuple[float, float, Callable[[], Any] | None], rounding: float) -> ParamCheck:
    g = ours.detach().reshape(-1).double()
    ref = reference.detach().reshape(-1).double()
    scale = max(float(p.detach().abs().max()), 1e-2) if p.numel() else 1.0      # s_p
    floor = rho * abs(objective.f0) / scale                                      # floor_p
    finite = torch.isfinite(ref)
    nonfinite = int((~finite).sum())
    want = ref[finite]
    # |g − g_ad| ≤ rtol·max(max |g_ad|, floor_p) or within both values' rounding, 2·R_p
    normalizer = max(float(want.abs().max()) if want.numel() else 0.0, floor, 2 * rounding / rtol)
    ad_error = _error(g[finite], want, normalizer) if want.numel() else float("nan")
    zero = bool(torch.isfinite(g).all()) and not bool((g.abs() > rtol * normalizer).any())
    if not bool(torch.isfinite(g).all()):
        return ParamCheck(name, ad_error, float("nan"), 0, False, False, nonfinite, 0, 0, floor, "FAIL",
                          rounding)
    fd_error, one_sided, skipped = float("nan"), 0, 0
    judged: list[int] = []
    if use_fd and p.numel():
        fd_error, judged, one_sided, skipped = _fd_check(p, g, ref, objective, elements, fd_rtol, floor, gen,
                                                         bounds, rounding)
    count = len(judged)
    ad_ok = math.isnan(ad_error) or ad_error <= rtol
    fd_ok = count == 0 or fd_error <= fd_rtol
    if not (ad_ok and fd_ok):
        status = "FAIL"
    elif nonfinite and all(bool(finite[i]) for i in judged):
        status = "unverified"       # no element without an autograd reference judged, none disagrees
    else:
        status = "pass"
    limited = 2 * rounding > rtol * max(float(want.abs().max()) if want.numel() else 0.0, floor)
    return ParamCheck(name, ad_error, fd_error, count, zero, status != "FAIL", nonfinite, skipped,
                      one_sided, floor, status, rounding, limited)


def _range(meta: Any, name: str, p: Tensor) -> tuple[float, float, Callable[[], Any] | None]:
    """The values meta-parameter ``name`` may take: a hyperparameter's valid range where
    the meta-parameter holds the value itself (``transform="project"``), else all reals;
    and, for such a hyperparameter, a context in which the range's clamp is lifted (to
    look past an end of it, where L^val may have a kink of its own)."""
    hyper = name[len("hypers."):] if name.startswith("hypers.") else None
    if hyper is None or getattr(meta, "transform", {}).get(hyper) != "project":
        return -math.inf, math.inf, None
    lo, hi = meta.ranges[hyper].representable(p.dtype)

    @contextlib.contextmanager
    def unclamped() -> Iterator[None]:
        saved = meta.ranges[hyper]
        meta.ranges[hyper] = Interval()
        try:
            yield
        finally:
            meta.ranges[hyper] = saved

    return float(lo), float(hi), unclamped


def _error(got: Tensor, want: Tensor, scale: float) -> float:
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _fd_check(p: Tensor, g: Tensor, ref: Tensor, objective: _Objective, elements: int, fd_rtol: float,
              floor: float, gen: torch.Generator,
              bounds: tuple[float, float, Callable[[], Any] | None],
              rounding: float) -> tuple[float, list[int], int, int]:
    """Finite differences on up to ``elements`` elements where L^val is smooth enough to
    judge (twice as many where the autograd reference is not finite somewhere: they are
    then the only reference; trying up to twice as many): the largest error relative to
    max(max |fd|, floor, (error bar + R_p) / fd_rtol), so that an element passes within
    fd_rtol of the scale or within its estimate's own error bar plus gimli's rounding
    R_p; the elements judged, how many of them by a one-sided derivative, and how many
    were skipped."""
    judged: list[tuple[int, _Estimate]] = []
    skipped = 0
    if not bool(torch.isfinite(ref).all()):
        elements *= 2
    for i in _elements(g, ref, elements, gen):
        if len(judged) == min(elements, p.numel()):
            break
        value = float(g[i])

        def agrees(e: _Estimate) -> bool:
            return abs(value - e.value) <= max(fd_rtol * max(abs(e.value), floor), e.bar + rounding)

        est = _derivative(objective, p, i, floor, fd_rtol, agrees, *bounds)
        if est is None:
            skipped += 1
        else:
            judged.append((i, est))
    if not judged:
        return float("nan"), [], 0, skipped
    scale = max(max(abs(e.value) for _, e in judged), floor)
    worst = max(_error(g[i:i + 1], torch.tensor([e.value], dtype=g.dtype, device=g.device),
                       max(scale, (e.bar + rounding) / fd_rtol)) for i, e in judged)
    return worst, [i for i, _ in judged], sum(e.kind != "central" for _, e in judged), skipped


def _elements(g: Tensor, ref: Tensor, k: int, gen: torch.Generator) -> list[int]:
    """Candidates, best first: the largest entries (of gimli's value and the finite
    reference), then up to k where the autograd reference is not finite, then random
    others; 2k in all, so that skipped ones can be replaced."""
    n = g.numel()
    size = torch.maximum(g.abs(), torch.nan_to_num(ref.abs(), nan=0.0, posinf=0.0))
    order = [int(i) for i in torch.randperm(n, generator=gen)]
    largest = [int(i) for i in torch.topk(size, min((k + 1) // 2, n)).indices]
    bad = [i for i in order if not math.isfinite(float(ref[i]))][:k]
    out: list[int] = []
    for i in largest + bad + order:
        if i not in out:
            out.append(i)
        if len(out) == min(2 * k, n):
            break
    return out


class _Estimate(NamedTuple):
    value: float        # the derivative's estimate
    bar: float          # its error bar: rounding, plus twice the measured inconsistency
    kind: str           # "central", "forward" or "backward"


def _derivative(objective: _Objective, p: Tensor, i: int, floor: float, fd_rtol: float,
                agrees: Callable[[_Estimate], bool], lo: float = -math.inf,
                hi: float = math.inf, unclamped: Callable[[], Any] | None = None) -> _Estimate | None:
    """∂L^val/∂p_i where L^val is smooth enough to tell (module docstring, 2–3): central
    differences at h, h/16, h/256, h/4096, the first smooth one; at each step size that
    is not, a smooth one-sided derivative that ``agrees`` with gimli's value (at a kink
    at x, or where L^val curves too fast on one side). None where there is neither: the
    element is skipped. An evaluation whose unroll is not finite (a perturbation past
    where the optimizer breaks) is nan, and makes its stencil unusable.

    [lo, hi] is the range of p's values (a hyperparameter's valid range, where the
    meta-parameter holds it directly): the differences stay inside, and at an end of it
    the derivative is the one-sided one into the range, judged like a central one (it is
    what gimli and autograd compute: the range's clamp passes the gradient at its ends;
    outside, L^val is flat)."""
    x = float(p.detach().reshape(-1)[i])
    h0 = H_REL * max(abs(x), 1e-2)    # small: a β₂ of 0.999 is 1e-3 from where Adam breaks
    for room in (abs(x), x - lo, hi - x):
        if room > 0:                  # x ± h keeps x's sign (an eps of 1e-8 stays positive)
            h0 = min(h0, room / 2)    # and stays inside the range
    inward = 1 if x <= lo else -1 if x >= hi else 0     # at an end of the range
    values = {0.0: objective.f0}

    def f(t: float) -> float:         # L^val with p_i = x + t; nan where the unroll is not finite
        if t not in values:
            with torch.no_grad():
                p.view(-1)[i] = x + t
            try:
                values[t] = objective()
            except FloatingPointError:
                values[t] = math.nan
            finally:
                with torch.no_grad():
                    p.view(-1)[i] = x
        return values[t]

    def delta() -> float:             # the rounding of one evaluation, δ = κ·ε·|L^val|
        return KAPPA * objective.eps * max(abs(v) for v in values.values() if math.isfinite(v))

    def smooth(inconsistency: float, value: float, noise: float) -> bool:
        return math.isfinite(value) and inconsistency <= max(fd_rtol * max(abs(value), floor) / 2, noise)

    def central(h: float) -> _Estimate | None:
        fp, fm, fp2, fm2 = f(h), f(-h), f(h / 2), f(-h / 2)
        d1, d2 = (fp - fm) / (2 * h), (fp2 - fm2) / h
        value = (4 * d2 - d1) / 3                               # Richardson: O(h⁴)
        s1, s2 = fp - 2 * values[0.0] + fm, fp2 - 2 * values[0.0] + fm2
        kink = max(abs(d1 - d2), abs(s1 - 4 * s2) / h)          # O(h²) and O(h³) where smooth
        d = delta()
        return _Estimate(value, 3 * d / h + 2 * kink, "central") if smooth(kink, value, 16 * d / h) else None

    def one_sided(s: int, h: float) -> _Estimate | None:
        def slope(t: float) -> float:
            return (f(s * t) - values[0.0]) / (s * t)
        r1, r2 = 2 * slope(h / 2) - slope(h), 2 * slope(h / 4) - slope(h / 2)   # Richardson: O(h²)
        d = delta()
        kind = "forward" if s > 0 else "backward"
        if not smooth(abs(r1 - r2), r2, 18 * d / h):
            return None
        return _Estimate(r2, 16 * d / h + 2 * abs(r1 - r2), kind)

    for k in range(LEVELS):
        h = h0 / RETRY ** k
        if inward:
            est = one_sided(inward, h)
            if est is not None and not agrees(est) and unclamped is not None:
                with unclamped():       # past the end: L^val may have a kink there itself
                    outward = one_sided(-inward, h)
                if outward is not None:
                    between = _Estimate((est.value + outward.value) / 2, abs(est.value - outward.value) / 2
                                        + max(est.bar, outward.bar), "between")
                    est = next((e for e in (outward, between) if agrees(e)), est)
        else:
            est = central(h)
            sides = [] if est is not None else [one_sided(1, h), one_sided(-1, h)]
            est = next((e for e in sides if e is not None and agrees(e)), est)
            right, left = sides if sides else (None, None)
            if est is None and right is not None and left is not None:
                # a kink with both sides smooth: any value between the one-sided derivatives
                # is a derivative there (autograd, at a tie of max or clamp, takes the mean)
                between = _Estimate((left.value + right.value) / 2, abs(left.value - right.value) / 2
                                    + max(left.bar, right.bar), "between")
                est = between if agrees(between) else None
        if est is not None:
            return est
    return None


def _amplification(twin: GimliSolver, batches: list[Any], val_batch: Any, seed: int) -> dict[str, float]:
    """Per meta-parameter, max_i ‖∂θ_J/∂φ_i‖₂ (θ_J the unroll's final weights): the root
    mean square over PROBES Gaussian w of |(∂θ_J/∂φ)ᵀ w|_i, each computed by gimli's own
    sweep with w·θ_J as the validation loss (closed-form VJPs: finite where autograd's
    are NaN). E|(Jᵀw)_i|² = ‖J e_i‖², the size of the terms φ_i's hypergradient sums."""
    from ._solver import GimliSolver

    problem = twin.problem
    gen = torch.Generator().manual_seed(seed + 1)
    total: dict[str, Tensor] = {}
    for _ in range(PROBES):
        w = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
             for n, p in problem.module.named_parameters()}

        def functional(model: Any, batch: Any, meta: Any, w: dict[str, Tensor] = w) -> Tensor:  # w·θ_J
            return sum(((p * w[n]).sum() for n, p in model.named_parameters()), torch.zeros(()))

        probe = GimliSolver(problem.module, problem.loss_fn, problem.inner.torch_optimizer, twin.meta,
                            val_loss_fn=functional, scheduler=problem.scheduler, memory=twin.memory,
                            snapshots=twin.snapshots, first_order=twin.first_order, truncate=twin.truncate,
                            distributed=False, val_mode=problem.val_mode, clip=problem.clip,
                            _shadows=copy.deepcopy(problem.shadows))
        torch.manual_seed(seed)
        for name, g in probe.hypergradient(batches, val_batch).items():
            total[name] = total.get(name, 0) + g.detach().double() ** 2
    return {name: float((t / PROBES).sqrt().max()) if t.numel() else 0.0 for name, t in total.items()}


# --- the copy and the function it differentiates --------------------------------------------
def _twin(solver: GimliSolver, dtype: torch.dtype | None) -> GimliSolver:
    """A solver over deep copies of the user's objects, copied together so that the
    copied optimizer holds the copied model's parameters. It computes locally
    (``distributed=False``): the check is of this process's own hypergradient."""
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
    if meta.inner is not None:          # flags read again under the default dtype (NAdam's, ASGD's scalars)
        meta.inner = bind(opt)
    # the solver's own mode, forward or reverse; forward mode's carried tangents are not
    # copied: the check is of the hypergradient over these batches (horizon="window")
    mode = solver.last_mode if solver.mode == "auto" and solver.last_mode else solver.mode
    return GimliSolver(model, problem.loss_fn, opt, meta, val_loss_fn=problem.val_loss_fn,
                       scheduler=scheduler, memory=solver.memory, snapshots=solver.snapshots,
                       first_order=solver.first_order, truncate=solver.truncate, distributed=False,
                       mode=mode, val_mode=problem.val_mode, clip=problem.clip,
                       _shadows=copy.deepcopy(problem.shadows))     # a schedule followed so far


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


class _Objective:
    """L^val(θ'_J) after the unroll as a function of the meta-parameters' current values
    (forward only, no graphs), with the solver's stop-gradients: under ``first_order``
    each G_j is evaluated on the unperturbed trajectory θ̄_j (its dependence on θ is
    cut, its dependence on φ^loss kept), and under ``truncate=K`` the first J − K steps
    are those of the unperturbed unroll. The buffers (BatchNorm's running statistics)
    are those of the unperturbed unroll at every step: the unroll updates them without
    gradients, as torch does, so no hypergradient (gimli's or autograd's) follows their
    dependence on φ, which a loss in eval mode would otherwise show. Its derivative is
    what the solver computes."""

    def __init__(self, solver: GimliSolver, batches: list[Any], val_batch: Any, seed: int):
        self.problem, self.batches, self.val_batch, self.seed = solver.problem, batches, val_batch, seed
        self.first_order = solver.first_order
        J = len(batches)
        self.cut = 0 if solver.truncate is None else max(0, J - solver.truncate)
        self.eps = torch.finfo(self.problem.inner.params[0].dtype).eps
        self.trajectory: list[Point] = []            # θ̄_j, σ̄_j and buffers, j = 0 … J
        self.rng: list[Tensor] = []                  # the random-number state entering step j
        self.grad_norm = 0.0                         # ‖∇_θ L^val(θ̄_J)‖
        self.f0 = self._run(record=True)

    def __call__(self) -> float:
        return self._run(record=False)

    def _run(self, record: bool) -> float:
        problem, J = self.problem, len(self.batches)
        run = Unroll(problem, problem.split(J).per_step(J), self.batches, memory="recompute", graph=False,
                     check_each=True)
        first = 0 if record else self.cut
        if first == 0:
            torch.manual_seed(self.seed)
            point = run.start                       # θ₀ as it is now (a perturbed init. entry)
        else:
            point = self.trajectory[first]
            torch.set_rng_state(self.rng[first])
        with torch.enable_grad():
            for j in range(first, J):
                if record:
                    self.trajectory.append(point)
                    self.rng.append(torch.get_rng_state())
                else:                                   # the buffers: constants (class doc)
                    point = point._replace(buffers=self.trajectory[j].buffers)
                if self.first_order and not record:     # G_j on θ̄_j, the step from θ'_j
                    step, buffers = run.grads(j, self.trajectory[j], graph=False)
                    G = [None if g is None else g.detach() for g in step.grads]
                    theta, state = problem.inner.step(point.theta, point.state, G, run.hypers[j])
                    point = point._replace(theta=theta, state=state, buffers=buffers)
                else:
                    point = run.run(j, point, graph=False)[1]
            if not record:
                buffers = {n: b.clone() for n, b in self.trajectory[J].buffers.items()}
                return float(problem.val_loss(point.theta, buffers, self.val_batch).detach())
            self.trajectory.append(point)
            theta = [t.detach().requires_grad_() for t in point.theta]
            val = problem.val_loss(theta, {n: b.clone() for n, b in point.buffers.items()}, self.val_batch)
            grads = torch.autograd.grad(val, theta, allow_unused=True)
            self.grad_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
            return float(val.detach())
