"""Implicit hypergradients against unrolled ones: time and peak memory as J grows.

    python benchmarks/implicit.py            # J up to 2,560, ~3 min on 2 CPU cores
    python benchmarks/implicit.py --quick    # J up to 640

The problem is ``l2_momentum``'s (``tasks.py``): per-layer L2 log-coefficients (φ^loss)
of a 32-128-128-10 tanh MLP (22,026 parameters) under SGD with momentum 0.9, float32,
one thread. One hypergradient by reverse mode (``memory="retain"`` up to J = 640, and
``"recompute"``) and by ``mode="implicit"`` with MINRES capped at 20 Hessian-vector
products (``gimli.Implicit(method="minres", iterations=20)``; the random-data loss is
not convex, so CG's assumption may fail). Each runs in a forked child, as ``run.py``
measures memory: the peak RSS growth over the RSS before the call (large blocks
mmapped), and the call's seconds after a warm-up on 10 steps.

The implicit hypergradient is the converged training's, the unrolled one the J-step
training's: they agree only as the inner loop converges (``tests/test_implicit.py`` and
``examples/implicit_convergence.py`` show that); this table is about cost.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import torch
from torch import Tensor

import gimli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MIB, _forked, _mmap_large_blocks, peak_mb, side_benchmark  # noqa: E402
from tasks import TASKS, Instance  # noqa: E402

IMPLICIT = gimli.Implicit(method="minres", iterations=20)


def solver(inst: Instance, how: str) -> gimli.GimliSolver:
    opt = inst.make_opt(inst.model)
    meta = gimli.MetaParams(loss={k: v.clone() for k, v in inst.phi_loss.items()})

    def loss_fn(m: gimli.FunctionalModel, batch: Any, meta: gimli.MetaParams) -> Tensor:
        return inst.loss(m, dict(m.named_parameters()), batch, {"log_l2": meta["log_l2"]})  # type: ignore[dict-item]

    def val_loss_fn(m: gimli.FunctionalModel, batch: Any, meta: gimli.MetaParams) -> Tensor:
        return inst.val_loss(m, batch)

    kwargs: dict[str, Any] = {"mode": "implicit", "implicit": IMPLICIT} if how == "implicit" \
        else {"memory": how}
    return gimli.GimliSolver(inst.model, loss_fn, opt, meta, val_loss_fn=val_loss_fn, **kwargs)


def peak(J: int, how: str) -> dict[str, Any]:
    """In a fresh (forked) process: one hypergradient's peak RSS growth and its seconds."""
    _mmap_large_blocks()
    torch.set_num_threads(1)
    inst = TASKS["l2_momentum"].build(J)
    s = solver(inst, how)
    with warnings.catch_warnings():     # the capped solve's residual: reported in the table
        warnings.simplefilter("ignore", gimli.GimliWarning)
        s.hypergradient(inst.train[:10], inst.val)          # warm-up
        t = time.perf_counter()
        mb = peak_mb(lambda: s.hypergradient(inst.train, inst.val))
    out = {"mb": mb, "s": time.perf_counter() - t}
    if s.last_implicit is not None:
        out["residual"] = s.last_implicit.residual
    return out


def main() -> None:
    args = side_benchmark(__doc__, "J up to 640")
    theta = sum(p.numel() for p in TASKS["l2_momentum"].build(1).model.parameters()) * 4 / MIB
    print(f"\nOne hypergradient of l2_momentum: seconds and peak MB above the RSS before it; "
          f"|θ| = |σ| = {theta:.3f} MB")
    print("| J | retain (s) | recompute (s) | implicit (s) | retain (MB) | recompute (MB) | implicit (MB) "
          "| implicit's residual |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for J in ([40, 160, 640] if args.quick else [40, 160, 640, 2560]):
        found = {how: _forked(peak, J, how) if how != "retain" or J <= 640 else None
                 for how in ("retain", "recompute", "implicit")}

        def cell(how: str, key: str, fmt: str) -> str:
            x = found[how]
            return "—" if x is None else x.get("error", format(x.get(key, float("nan")), fmt))

        print(f"| {J:,} | " + " | ".join(cell(h, "s", ".2f") for h in found) + " | "
              + " | ".join(cell(h, "mb", ".1f") for h in found) + f" | {cell('implicit', 'residual', '.1e')} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
