"""iMAML beside MAML on sine waves: implicit hypergradients of the initial weights.

The tasks, model and score are ``maml_sine.py``'s (1-40-40-1 ReLU MLP, K = 10 support
points, the query MSE of 100 new tasks after adaptation with the real
``torch.optim.SGD``). Both learn θ₀ with J inner SGD steps (lr 0.02):

* MAML differentiates the J steps (reverse mode): its memory grows with J;
* iMAML (Rajeswaran et al. 2019) adapts on ℓ + λ/2·‖θ − θ₀‖² (λ = 5) and takes the
  implicit hypergradient at the end, λ(H + λI)⁻¹∇L^val, from at most 100 MINRES steps
  to a relative residual of 1e-2 (``mode="implicit"``, ``gimli.Implicit(method="minres",
  proximal=5.0, iterations=100, tol=1e-2)``; MINRES because the curvature of ℓ goes below
  −λ, where conjugate gradients break down): its memory does not depend on J, and
  neither does the cost beyond the J steps themselves.

Each is scored with its own inner loop (iMAML's keeps the proximal term). Then one
meta-step of each is timed, and its peak memory measured (the process's peak RSS above
the RSS before it; Linux), as J grows.

    python examples/imaml_sine.py           # 300 meta-iterations each, J = 10; then J up to 320
    python examples/imaml_sine.py --quick   # the CI run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:       # _support.py sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support import OUTPUT, Progress, one_thread, peak_mb_in_child, pyplot, save  # noqa: E402
from maml_sine import TEST_SEED, Task, loss_fn, sample_task  # noqa: E402

INNER_LR = 0.02
LAMBDA = 5.0            # iMAML's proximal strength
SOLVE_STEPS = 100       # MINRES iterations: H + λI may be indefinite (ℓ's curvature reaches −4)
META_LR = 3e-3
META_BATCH = 4
BUDGETS = {"quick": (20, 10, (10, 40)), "default": (300, 10, (10, 40, 160, 320))}   # (iterations, J, Js timed)


def build(method: str, seed: int, proximal: float) -> gimli.GimliSolver:
    torch.manual_seed(seed)                 # the same θ₀ for both methods
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    meta = gimli.MetaParams(init=model)
    kwargs: dict[str, Any] = {"mode": "implicit", "implicit": gimli.Implicit(
        method="minres", proximal=proximal, iterations=SOLVE_STEPS, tol=1e-2)} if method == "iMAML" else {}
    return gimli.GimliSolver(model, loss_fn, opt, meta,
                             meta_opt=torch.optim.Adam(meta.parameters(), lr=META_LR), **kwargs)


def adapted_mse(solver: gimli.GimliSolver, task: Task, steps: int, proximal: float) -> float:
    """The query MSE after ``steps`` steps of the real torch.optim.SGD on the support set
    (on ℓ + λ/2‖θ − θ₀‖² for iMAML), from a copy of θ₀."""
    model = solver.problem.module
    clone = copy.deepcopy(model)
    anchor = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(clone.parameters(), lr=INNER_LR)
    x, y = task.support
    for _ in range(steps):
        sgd.zero_grad()
        loss = F.mse_loss(clone(x), y)
        if proximal:
            loss = loss + proximal / 2 * sum(((p - a) ** 2).sum() for p, a in zip(clone.parameters(), anchor))
        loss.backward()
        sgd.step()
    with torch.no_grad():
        return F.mse_loss(clone(task.query[0]), task.query[1]).item()


def score(solver: gimli.GimliSolver, tasks: list[Task], steps: int, proximal: float) -> float:
    """The mean query MSE of new tasks after adaptation (with the proximal term, if any)."""
    return sum(adapted_mse(solver, t, steps, proximal) for t in tasks) / len(tasks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proximal", type=float, default=LAMBDA, help=f"iMAML's λ (default {LAMBDA})")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where the figure goes")
    args = parser.parse_args(argv)
    iterations, steps, timed = BUDGETS["quick" if args.quick else "default"]
    with one_thread():
        return run(args, iterations, steps, timed)


def run(args: argparse.Namespace, iterations: int, steps: int, timed: tuple[int, ...]) -> dict[str, Any]:
    test_tasks = [sample_task(torch.Generator().manual_seed(TEST_SEED + i)) for i in range(100)]
    scores: dict[str, dict[str, float]] = {}
    for method in ("MAML", "iMAML"):
        proximal = args.proximal if method == "iMAML" else 0.0
        solver = build(method, args.seed, args.proximal)
        gen = torch.Generator().manual_seed(args.seed)         # the same training tasks for both
        before = score(solver, test_tasks, steps, proximal)
        residuals = []                  # each meta-step's last MINRES residual (iMAML)
        start = time.perf_counter()
        with warnings.catch_warnings():     # a solve above tol: reported below, not warned
            warnings.simplefilter("ignore", gimli.GimliWarning)
            for _ in Progress(range(iterations), desc=method):
                tasks = [sample_task(gen) for _ in range(META_BATCH)]
                solver.step(tasks=[([t.support] * steps, t.query) for t in tasks])
                if solver.last_implicit is not None:
                    residuals.append(solver.last_implicit.residual)
        seconds = time.perf_counter() - start
        scores[method] = {"before": before, "after": score(solver, test_tasks, steps, proximal),
                          "seconds": seconds}
        if residuals:
            residuals.sort()
            scores[method]["median_residual"] = residuals[len(residuals) // 2]
            scores[method]["worst_residual"] = residuals[-1]
    print(f"\nQuery MSE on 100 new tasks after J = {steps} SGD steps (lr {INNER_LR}) on each task's "
          f"support set (lower is better), {iterations} meta-iterations of {META_BATCH} tasks:")
    for method, s in scores.items():
        print(f"  {method:5}  {s['before']:.2f} → {s['after']:.2f}   ({s['seconds']:.1f} s of meta-training)")
    iMAML = scores["iMAML"]
    print(f"iMAML's MINRES relative residuals (tol 1e-2, at most {SOLVE_STEPS} products): median "
          f"{iMAML['median_residual']:.1e}, worst {iMAML['worst_residual']:.1e}")

    costs: dict[str, list[tuple[int, float, float | None]]] = {"MAML": [], "iMAML": []}
    task = sample_task(torch.Generator().manual_seed(99))
    for J in timed:
        for method in costs:
            def ready(method: str = method, J: int = J) -> Any:
                """A solver warmed up (on 2 steps), and its call on the J steps."""
                solver = build(method, args.seed, args.proximal)
                solver.hypergradient([task.support] * 2, task.query)
                return lambda: solver.hypergradient([task.support] * J, task.query)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gimli.GimliWarning)
                call = ready()
                t0 = time.perf_counter()
                call()
                seconds = time.perf_counter() - t0
                costs[method].append((J, seconds, peak_mb_in_child(ready)))
    print("\nOne hypergradient (one task), time and peak memory above the RSS before it:")
    print(f"{'J':>6} {'MAML (s)':>10} {'iMAML (s)':>10} {'MAML (MB)':>10} {'iMAML (MB)':>11}")
    for (J, ms, mm), (_, isec, im) in zip(costs["MAML"], costs["iMAML"]):
        mb = [f"{x:.1f}" if x is not None else "n/a" for x in (mm, im)]
        print(f"{J:>6} {ms:>10.3f} {isec:>10.3f} {mb[0]:>10} {mb[1]:>11}")

    figures = []
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for method, style in (("MAML", "C0o-"), ("iMAML", "C2^-")):
            Js = [c[0] for c in costs[method]]
            axes[0].plot(Js, [c[1] for c in costs[method]], style, label=method)
            if all(c[2] is not None for c in costs[method]):
                axes[1].plot(Js, [c[2] for c in costs[method]], style, label=method)
        axes[0].set(xscale="log", yscale="log", xlabel="inner steps J", ylabel="seconds",
                    title="one hypergradient: time")
        axes[1].set(xscale="log", xlabel="inner steps J", ylabel="MB above the RSS before",
                    title="one hypergradient: peak memory")
        for ax in axes:
            ax.legend(fontsize=8)
            ax.title.set_fontsize(10)
        figures.append(str(save(fig, args.out, "imaml_sine.png")))
    return {"scores": scores, "costs": costs, "figures": figures}


if __name__ == "__main__":
    main()
