"""Unrolled, truncated and implicit hypergradients as the inner loop converges.

A small tanh MLP (2-8-1) is trained on a fixed regression batch with SGD (lr 0.3,
momentum 0.5) and a learned L2 coefficient exp(φ) in its training loss; the validation
loss is the error on held-out points. The hypergradient dL^val/dφ is computed after J
inner steps three ways:

* unrolled: reverse mode through all J steps (exact for the J-step training);
* truncated: reverse mode through the last 10 steps only (``truncate=10``);
* implicit: the implicit function theorem at θ_J (``mode="implicit"``), which assumes
  θ_J is a stationary point.

As J grows the training converges, and the exact answer becomes the hypergradient of
the converged training, the implicit one at the limit (the reference: implicit at
J = 3000, where ‖∇ℓ‖ is at rounding). The figure shows each method's error against J:
the unrolled and the implicit errors fall together with ‖∇ℓ(θ_J)‖; the truncated one stalls.

    python examples/implicit_convergence.py           # J up to 1600, about 20 s
    python examples/implicit_convergence.py --quick   # the CI run, J up to 200
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:       # _support.py sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support import OUTPUT, one_thread, pyplot, save  # noqa: E402

STEPS = {"quick": (25, 50, 100, 200), "default": (25, 50, 100, 200, 400, 800, 1600)}
REFERENCE_STEPS = 3000
TRUNCATE = 10


def problem() -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The model (the same start every run), the training batch and the validation batch."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 2, generator=gen, dtype=torch.float64)
    xv = torch.randn(16, 2, generator=gen, dtype=torch.float64)

    def target(x: Tensor) -> Tensor:
        return torch.sin(2 * x[:, :1]) + x[:, 1:] ** 2

    return model, (x, target(x)), (xv, target(xv))


def train_loss(model: Any, batch: Any, meta: gimli.MetaParams) -> Tensor:
    x, y = batch
    weights = sum((p ** 2).sum() for p in model.parameters())
    return F.mse_loss(model(x), y) + meta["log_l2"].exp() * weights


def val_loss(model: Any, batch: Any, meta: gimli.MetaParams) -> Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def hypergradient(J: int, **kwargs: Any) -> tuple[float, gimli.GimliSolver]:
    start, train, val = problem()
    model = copy.deepcopy(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    meta = gimli.MetaParams(loss={"log_l2": torch.tensor(-3.0, dtype=torch.float64)})
    solver = gimli.GimliSolver(model, train_loss, opt, meta, val_loss_fn=val_loss, **kwargs)
    return float(solver.hypergradient([train] * J, val)["loss.log_l2"]), solver


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="J up to 200 (the CI run)")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where the figure goes")
    args = parser.parse_args(argv)
    steps = STEPS["quick" if args.quick else "default"]
    with one_thread():
        reference, _ = hypergradient(REFERENCE_STEPS, mode="implicit", implicit=gimli.Implicit(method="dense"))
        errors: dict[str, list[float]] = {"unrolled": [], "truncated": [], "implicit": []}
        gradient_norms = []
        print(f"dL^val/dφ of the converged training (implicit, J = {REFERENCE_STEPS}): {reference:.10f}")
        print(f"{'J':>6} {'‖∇ℓ(θ_J)‖':>12} {'unrolled':>12} {'truncated':>12} {'implicit':>12}   (|error|)")
        for J in steps:
            unrolled, _ = hypergradient(J, memory="recompute")
            truncated, _ = hypergradient(J, memory="recompute", truncate=TRUNCATE)
            implicit, solver = hypergradient(J, mode="implicit", implicit=gimli.Implicit(method="dense"))
            assert solver.last_implicit is not None
            gradient_norms.append(solver.last_implicit.gradient_norm)
            for name, value in (("unrolled", unrolled), ("truncated", truncated), ("implicit", implicit)):
                errors[name].append(abs(value - reference))
            print(f"{J:>6} {gradient_norms[-1]:>12.2e} " + " ".join(f"{errors[n][-1]:>12.2e}" for n in errors))
    figures = []
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        floor = 1e-17
        for name, style in (("unrolled", "C0o-"), ("truncated", "C1s-"), ("implicit", "C2^-")):
            label = f"truncated (last {TRUNCATE} steps)" if name == "truncated" else name
            ax.plot(steps, [max(e, floor) for e in errors[name]], style, label=label)
        ax.plot(steps, gradient_norms, "k:", label="‖∇ℓ(θ_J)‖")
        ax.set(xscale="log", yscale="log", xlabel="inner steps J",
               ylabel="|hypergradient − converged one|",
               title="dL^val/dφ (L2 coefficient) as the inner loop converges")
        ax.title.set_fontsize(10)
        ax.legend(fontsize=8)
        figures.append(str(save(fig, args.out, "implicit_convergence.png")))
    return {"steps": list(steps), "reference": reference, "errors": errors,
            "gradient_norms": gradient_norms, "figures": figures}


if __name__ == "__main__":
    main()
