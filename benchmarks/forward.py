"""Forward mode against reverse mode: time per unroll step, and peak memory as J grows.

    python benchmarks/forward.py                 # ~6 min on 2 CPU cores
    python benchmarks/forward.py --quick         # J up to 1,000, fewer repetitions

The problem is ``adam_lrs``'s (``tasks.py``): a 32-128-128-10 tanh MLP (22,026
parameters), Adam (lr 1e-3), cross-entropy on random data, batch 64, float32, one
thread. K, the number of tangent directions forward mode carries, is set by what is
meta-learned:

* K = 1: the lr, one for all tensors;
* K = 4: lr, β₁, β₂ and the weight decay, one each;
* K = 16: one lr per tensor (6) and a log-weight per class in the cross-entropy (10, φ^loss).

**Time** (J = 50, the calls interleaved, 5 repetitions, medians): one hypergradient per
unroll step, as × one plain training step (``zero_grad``/forward/``backward``/``step``
of the real ``torch.optim.Adam``), for forward mode and for reverse mode (retain).

**Memory** (K = 4): the peak RSS growth of one hypergradient in a forked child, as
``run.py`` measures it (VmHWM over VmRSS before the call, large blocks mmapped), for
J = 10 … 10,000: forward mode, and reverse mode with ``memory="recompute"`` (the
leanest mode that keeps every point) and ``"retain"`` (up to J = 1,000).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import gimli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import plain_step  # noqa: E402
from run import MIB, _forked, _mmap_large_blocks, peak_mb, side_benchmark  # noqa: E402
from tasks import TASKS, Instance  # noqa: E402

SPECS: dict[int, tuple[dict[str, str], bool]] = {       # K -> (hyperparameters, class weights)
    1: ({"lr": "scalar"}, False),
    4: ({"lr": "scalar", "beta1": "scalar", "beta2": "scalar", "weight_decay": "scalar"}, False),
    16: ({"lr": "tensor"}, True),
}


def solver(inst: Instance, K: int, mode: str, memory: str = "retain") -> gimli.GimliSolver:
    hypers, weighted = SPECS[K]
    opt = inst.make_opt(inst.model)
    loss = {"class_log_weight": torch.zeros(10)} if weighted else None
    meta = gimli.MetaParams(opt, hypers, loss=loss)

    def loss_fn(m: gimli.FunctionalModel, batch: Any, meta: gimli.MetaParams) -> Tensor:
        x, y = batch
        if not weighted:
            return F.cross_entropy(m(x), y)
        weight = meta["class_log_weight"].exp()[y]                       # type: ignore[union-attr]
        return (F.cross_entropy(m(x), y, reduction="none") * weight).mean()

    def val_loss_fn(m: gimli.FunctionalModel, batch: Any, meta: gimli.MetaParams) -> Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    return gimli.GimliSolver(inst.model, loss_fn, opt, meta, val_loss_fn=val_loss_fn, mode=mode,
                             memory=memory)


def time_table(J: int, reps: int) -> None:
    inst = TASKS["adam_lrs"].build(J)
    step = plain_step(inst)
    rows = []
    for K in SPECS:
        calls: dict[str, Callable[[], Any]] = {
            "plain": lambda: [step() for _ in range(J)],
            "forward": lambda s=solver(inst, K, "forward"): s.hypergradient(inst.train, inst.val),
            "reverse": lambda s=solver(inst, K, "reverse"): s.hypergradient(inst.train, inst.val),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        for fn in calls.values():
            fn()                                            # warm-up
        for r in range(reps):
            for name in list(calls)[r % 3:] + list(calls)[:r % 3]:
                t = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t)
        per = {k: statistics.median(v) / J for k, v in times.items()}
        rows.append((K, per["plain"], per["forward"], per["reverse"]))
    print(f"\nTime per unroll step (J = {J}), ms and × one plain training step")
    print("| K | plain step (ms) | forward (ms) | forward × | reverse, retain (ms) | reverse × | forward / reverse |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for K, plain, fwd, rev in rows:
        print(f"| {K} | {plain * 1e3:.2f} | {fwd * 1e3:.2f} | {fwd / plain:.1f} | {rev * 1e3:.2f} | "
              f"{rev / plain:.1f} | {fwd / rev:.2f} |")
    sys.stdout.flush()


def hvp_table(reps: int) -> None:
    """The Hessian of ℓ_j applied to K tangents, three ways, per unroll step: what forward
    mode needs besides G_j. Reverse-over-reverse needs G_j with its graph
    (``create_graph``), so its rows include that gradient; forward-over-reverse
    (``torch.func.jvp`` of ``torch.func.grad``) recomputes the gradient inside, so its
    rows include a plain gradient for G_j."""
    from torch.func import functional_call, grad, jvp, vmap

    inst = TASKS["adam_lrs"].build(1)
    model, batch = inst.model, inst.train[0]
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach().clone() for p in model.parameters())

    def loss(*params: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, params)), (batch[0],))
        return F.cross_entropy(out, batch[1])

    rows = []
    for K in (1, 4, 16):
        vs = [tuple(torch.randn_like(t) for t in theta) for _ in range(K)]
        stacked = tuple(torch.stack([v[i] for v in vs]) for i in range(len(theta)))

        def graph() -> tuple[list[Tensor], tuple[Tensor, ...]]:
            leaves = [t.clone().requires_grad_() for t in theta]
            return leaves, torch.autograd.grad(loss(*leaves), leaves, create_graph=True)

        def loop() -> None:
            leaves, G = graph()
            for v in vs:
                torch.autograd.grad(G, leaves, v, retain_graph=True)

        def batched() -> None:
            leaves, G = graph()
            torch.autograd.grad(G, leaves, stacked, is_grads_batched=True)

        g = grad(lambda ps: loss(*ps))

        def forward_over_reverse() -> None:
            g(theta)                                                # G_j itself
            vmap(lambda v: jvp(g, (theta,), (v,))[1])(stacked)

        times: dict[str, list[float]] = {"loop": [], "batched": [], "fwd": []}
        calls = {"loop": loop, "batched": batched, "fwd": forward_over_reverse}
        for fn in calls.values():
            fn()
        for r in range(reps):
            for name, fn in calls.items():
                t = time.perf_counter()
                for _ in range(20):
                    fn()
                times[name].append((time.perf_counter() - t) / 20)
        rows.append((K, *(statistics.median(times[k]) * 1e3 for k in ("loop", "batched", "fwd"))))
    print("\nThe Hessian of ℓ_j on K tangents, with G_j, per step (ms)")
    print("| K | reverse-over-reverse, one call per tangent | the same, batched (is_grads_batched) | "
          "forward-over-reverse (torch.func, vmap) |")
    print("|---:|---:|---:|---:|")
    for K, a, b, c in rows:
        print(f"| {K} | {a:.2f} | {b:.2f} | {c:.2f} |")
    sys.stdout.flush()


def peak(J: int, mode: str, memory: str) -> dict[str, Any]:
    """In a fresh (forked) process: one hypergradient's peak RSS growth and its time."""
    _mmap_large_blocks()
    torch.set_num_threads(1)
    inst = TASKS["adam_lrs"].build(J)
    s = solver(inst, 4, mode, memory)
    s.hypergradient(inst.train[:10], inst.val)          # warm-up
    t = time.perf_counter()
    mb = peak_mb(lambda: s.hypergradient(inst.train, inst.val))
    return {"mb": mb, "s": time.perf_counter() - t}


def memory_table(steps: list[int]) -> None:
    theta = sum(p.numel() for p in TASKS["adam_lrs"].build(1).model.parameters()) * 4 / MIB
    print(f"\nPeak memory of one hypergradient (K = 4), MB above the RSS before it, and its seconds; "
          f"|θ| = {theta:.3f} MB, |σ| = {2 * theta:.3f} MB")
    print("| J | forward (MB) | reverse, recompute (MB) | reverse, retain (MB) | forward (s) | recompute (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for J in steps:
        fwd = _forked(peak, J, "forward", "retain")
        rec = _forked(peak, J, "reverse", "recompute")
        ret = _forked(peak, J, "reverse", "retain") if J <= 1000 else None

        def mb(x: dict[str, Any] | None) -> str:
            return "—" if x is None else x.get("error", f"{x.get('mb', 0):.2f}")

        print(f"| {J:,} | {mb(fwd)} | {mb(rec)} | {mb(ret)} | {fwd.get('s', float('nan')):.1f} | "
              f"{rec.get('s', float('nan')):.1f} |")
        sys.stdout.flush()


def main() -> None:
    args = side_benchmark(__doc__, "J up to 1,000; 3 repetitions")
    time_table(50, 3 if args.quick else 5)
    hvp_table(3 if args.quick else 5)
    memory_table([10, 100, 1000] if args.quick else [10, 100, 1000, 10000])


if __name__ == "__main__":
    main()
