"""MAML on sine-wave regression (Finn et al. 2017, §5.1), with gimli's exact hypergradients.

Each task is y = A·sin(x + φ) with A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; K = 10
support points to adapt on, 10 query points to score the adapted model. MAML learns the
initial weights θ₀ of a 1-40-40-1 ReLU MLP so that J steps of plain SGD (lr 0.01) on the
support set fit the query set; ``--learn-lr`` also learns one inner lr per layer (Meta-SGD
style, one param group per layer).

The final score is independent of gimli: copy the model, take J steps of the real
``torch.optim.SGD`` on the support set of each of 100 new tasks, and measure the query
mean squared error (lower is better), before and after meta-training.

    python examples/maml_sine.py            # 800 meta-iterations, about 30 s on one CPU core
    python examples/maml_sine.py --full     # 2000 meta-iterations, about a minute
    python examples/maml_sine.py --quick    # the CI run, a few seconds

It needs only what ``pip install -e .`` installs. With matplotlib installed it saves a
figure to ``--out`` (default ``examples/output/maml_sine.png``, which git ignores): the
adapted curves, before and after meta-training, on the new tasks of low, median and high
amplitude (10th, 50th and 90th percentile), and every new task's error before and after.
The meta-learned θ₀ fits typical and large amplitudes far better after one step; on the
smallest ones its error can be higher than the random θ₀'s, whose curve stays near 0.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:       # _support.py sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support import OUTPUT, Progress, one_thread, pyplot  # noqa: E402

K = 10              # support points per task, and as many query points
INNER_LR = 0.01     # α, the inner SGD step size
META_LR = 3e-3      # meta-Adam's step size on θ₀ (and the learned lrs)
TEST_TASKS = 100    # new tasks of the final evaluation
TEST_SEED = 1234    # they are the same tasks whatever --seed is
PERCENTILES = (10, 50, 90)  # the figure's tasks: amplitudes at these percentiles of the new tasks

Batch = tuple[Tensor, Tensor]   # (x, y), each of shape (K, 1)


class Budget(NamedTuple):
    iterations: int     # meta-updates
    meta_batch: int     # tasks per meta-update


# The default run finishes in about 30 s on one core of a laptop or a shared machine, and
# shows the improvement clearly; --full keeps going to a lower error.
BUDGETS = {"quick": Budget(40, 4), "default": Budget(800, 8), "full": Budget(2000, 8)}


class Task(NamedTuple):
    support: Batch
    query: Batch


def sample_task(gen: torch.Generator) -> Task:
    """One sine task: K support and K query points of y = A·sin(x + φ)."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)      # A ~ U[0.1, 5]
    phase = math.pi * torch.rand((), generator=gen)            # φ ~ U[0, π]
    x = 10.0 * torch.rand(2 * K, 1, generator=gen) - 5.0       # x ~ U[−5, 5]
    y = amplitude * torch.sin(x + phase)
    return Task((x[:K], y[:K]), (x[K:], y[K:]))


def loss_fn(model: gimli.FunctionalModel, batch: Batch, meta: gimli.MetaParams) -> Tensor:
    """ℓ = mean squared error of the model (at θ'_j) on a batch; also used as L^val."""
    x, y = batch
    return F.mse_loss(model(x), y)


def adapt(model: nn.Module, inner_opt: torch.optim.Optimizer, task: Task, steps: int) -> nn.Module:
    """A copy of the model after `steps` steps of the real torch.optim.SGD on the support
    set, with the inner optimizer's param groups (learned lrs included)."""
    clone = copy.deepcopy(model)
    twin = {id(p): q for p, q in zip(model.parameters(), clone.parameters())}
    sgd = torch.optim.SGD([{**group, "params": [twin[id(p)] for p in group["params"]]}
                           for group in inner_opt.param_groups])
    x, y = task.support
    for _ in range(steps):                                       # θ ← θ − α ∇ℓ_support(θ)
        sgd.zero_grad()
        F.mse_loss(clone(x), y).backward()
        sgd.step()
    return clone


def adapted_mse(model: nn.Module, inner_opt: torch.optim.Optimizer, task: Task, steps: int) -> float:
    """Query MSE of the adapted copy: the score, independent of gimli."""
    clone = adapt(model, inner_opt, task, steps)
    with torch.no_grad():
        x, y = task.query
        return F.mse_loss(clone(x), y).item()


def adapted_mses(model: nn.Module, inner_opt: torch.optim.Optimizer, tasks: list[Task],
                 steps: int) -> list[float]:
    """Each task's query MSE after adaptation."""
    return [adapted_mse(model, inner_opt, t, steps) for t in tasks]


def mean_adapted_mse(model: nn.Module, inner_opt: torch.optim.Optimizer, tasks: list[Task],
                     steps: int) -> float:
    return sum(adapted_mses(model, inner_opt, tasks, steps)) / len(tasks)


def meta_step(solver: gimli.GimliSolver, tasks: list[Task], steps: int) -> float:
    """One MAML update from a meta-batch: ∇_φ (1/B) Σ_i L^val_i(θ'_J), then the meta-optimizer
    (and learned lrs written into inner_opt.param_groups). Returns the meta-batch's mean
    query MSE after adaptation, before the update."""
    return solver.step(tasks=[([t.support] * steps, t.query) for t in tasks]).val_loss


def amplitude(task: Task) -> float:
    return _fit_sine(task)[0]


def representative(tasks: list[Task], percentiles: tuple[int, ...] = PERCENTILES) -> list[int]:
    """The indices of the tasks whose amplitudes sit at these percentiles of the tasks'
    (the error grows with the amplitude, so these show a low, a typical and a high one)."""
    order = sorted(range(len(tasks)), key=lambda i: amplitude(tasks[i]))
    return [order[round(q / 100 * (len(tasks) - 1))] for q in percentiles]


def plot(before: tuple[nn.Module, torch.optim.Optimizer], after: tuple[nn.Module, torch.optim.Optimizer],
         tasks: list[Task], errors: tuple[list[float], list[float]], steps: int, path: Path) -> Path | None:
    """Left: adapted curves on the new tasks at the 10th, 50th and 90th amplitude
    percentile (the truth, the K support points, and the model after `steps` SGD steps
    from θ₀ before and after meta-training). Right: every new task's query MSE before
    and after, against its amplitude. None (and a line saying why) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    x = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig, axes = plt.subplots(1, len(PERCENTILES) + 1, figsize=(4.2 * (len(PERCENTILES) + 1), 3.6))
    for ax, q, i in zip(axes, PERCENTILES, representative(tasks)):
        task = tasks[i]
        xs, ys = task.support
        a, phase = _fit_sine(task)
        ax.plot(x, a * torch.sin(x + phase), "k-", lw=1, label="task")
        ax.plot(xs, ys, "ko", ms=4, label=f"K = {K} support points")
        for (model, opt), style, name in [(before, "C1--", "before meta-training"),
                                           (after, "C0-", "after meta-training")]:
            adapted = adapt(model, opt, task, steps)
            with torch.no_grad():
                ax.plot(x, adapted(x), style, label=f"adapted, {name}")
        ax.set_title(f"{q}th percentile: A = {a:.2f}\nquery MSE {errors[0][i]:.2f} → {errors[1][i]:.2f}",
                     fontsize=9)
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[-1]
    amplitudes = [amplitude(t) for t in tasks]
    for errs, style, name in [(errors[0], "C1x", "before"), (errors[1], "C0o", "after")]:
        ax.plot(amplitudes, errs, style, ms=4, label=f"{name} meta-training: mean {sum(errs) / len(errs):.2f}")
    ax.set(yscale="log", xlabel="task amplitude A", ylabel="query MSE after adaptation",
           title=f"all {len(tasks)} new tasks (lower is better)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.suptitle(f"MAML on sine waves: new tasks after {steps} SGD step(s) from θ₀", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fit_sine(task: Task) -> tuple[float, float]:
    """The task's amplitude and phase, recovered from its points for drawing: y = a·sin x + b·cos x."""
    x = torch.cat([task.support[0], task.query[0]])
    y = torch.cat([task.support[1], task.query[1]])
    basis = torch.cat([torch.sin(x), torch.cos(x)], 1)
    a, b = torch.linalg.lstsq(basis, y).solution.flatten().tolist()
    return math.hypot(a, b), math.atan2(b, a)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true",
                        help="a short run for CI: %d meta-iterations of %d tasks" % BUDGETS["quick"])
    length.add_argument("--full", action="store_true",
                        help="the long run: %d meta-iterations of %d tasks" % BUDGETS["full"])
    parser.add_argument("--iterations", type=int,
                        help="meta-iterations (default %d; --quick %d, --full %d)"
                        % tuple(BUDGETS[k].iterations for k in ("default", "quick", "full")))
    parser.add_argument("--meta-batch", type=int,
                        help="tasks per meta-iteration (default %d; --quick %d, --full %d)"
                        % tuple(BUDGETS[k].meta_batch for k in ("default", "quick", "full")))
    parser.add_argument("--steps", type=int, default=1, help="J, inner SGD steps per task (default 1)")
    parser.add_argument("--meta-lr", type=float, default=META_LR,
                        help=f"meta-Adam's step size (default {META_LR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn-lr", action="store_true",
                        help="also meta-learn one inner learning rate per layer")
    parser.add_argument("--out", type=Path, default=OUTPUT / "maml_sine.png",
                        help="where to save the figure (default examples/output/maml_sine.png)")
    args = parser.parse_args(argv)
    budget = BUDGETS["quick" if args.quick else "full" if args.full else "default"]
    budget = Budget(args.iterations or budget.iterations, args.meta_batch or budget.meta_batch)
    with one_thread():
        return run(args, budget)


def run(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)               # training tasks
    test_tasks = [sample_task(torch.Generator().manual_seed(TEST_SEED + i)) for i in range(TEST_TASKS)]

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    inner_opt = torch.optim.SGD([{"params": m.parameters()} for m in layers], lr=INNER_LR)
    meta = gimli.MetaParams(inner_opt, {"lr": "group"} if args.learn_lr else {}, init=model)
    meta_opt = torch.optim.Adam(meta.parameters(), lr=args.meta_lr)
    solver = gimli.GimliSolver(model, loss_fn, inner_opt, meta, meta_opt=meta_opt, steps=args.steps)

    before = adapted_mses(model, inner_opt, test_tasks, args.steps)
    initial = copy.deepcopy((model, inner_opt))                 # one copy: groups hold its params
    recent: deque[float] = deque(maxlen=max(1, budget.iterations // 10))
    progress = Progress(range(budget.iterations), desc="meta-training")
    for _ in progress:
        recent.append(meta_step(solver, [sample_task(gen) for _ in range(budget.meta_batch)], args.steps))
        progress.set_postfix_str(f"query MSE of the last {len(recent)} meta-batches "
                                 f"{sum(recent) / len(recent):.2f}")
    after = adapted_mses(model, inner_opt, test_tasks, args.steps)
    figure = plot(initial, (model, inner_opt), test_tasks, (before, after), args.steps, args.out)
    seconds = time.perf_counter() - start

    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    better = sum(b > a for b, a in zip(before, after))
    lrs = [float(g["lr"]) for g in inner_opt.param_groups]
    print(f"\nMean squared error on {TEST_TASKS} new sine tasks after {args.steps} SGD step(s) on "
          f"each task's {K} points (lower is better):\n"
          f"  before meta-training {mean_before:.2f}\n"
          f"  after meta-training  {mean_after:.2f}   ({mean_before / mean_after:.1f}× lower; "
          f"lower on {better} of the {TEST_TASKS} tasks)")
    if args.learn_lr:
        print("learned inner lrs per layer: " + ", ".join(f"{lr:.4f}" for lr in lrs))
    print(f"{budget.iterations} meta-iterations of {budget.meta_batch} tasks in {seconds:.0f} s"
          + (f"; figure: {figure}" if figure is not None else ""))
    return {"before": mean_before, "after": mean_after, "before_tasks": before, "after_tasks": after,
            "lrs": lrs, "figure": figure, "seconds": seconds, "budget": budget}


if __name__ == "__main__":
    main()
