"""MAML on sine-wave regression (Finn et al. 2017, §5.1), with gimli's exact hypergradients.

Each task is y = A·sin(x + φ) with A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; K = 10
support points to adapt on, 10 query points to score the adapted model. MAML learns the
initial weights θ₀ of a 1-40-40-1 ReLU MLP so that J steps of plain SGD (lr 0.01) on the
support set fit the query set; ``--learn-lr`` also learns one inner lr per layer (Meta-SGD
style, one param group per layer).

The final score is independent of gimli: copy the model, take J steps of the real
``torch.optim.SGD`` on the support set, and measure the query MSE, before and after
meta-training.

    python examples/maml_sine.py            # full run, a few minutes on a CPU
    python examples/maml_sine.py --quick    # the CI run, a few seconds

Both save a figure of the adapted curves on held-out tasks, before and after
meta-training, to ``--out`` (default ``examples/figures/maml_sine.png``).
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import gimli

FIGURES = Path(__file__).resolve().parent / "figures"
K = 10              # support points per task, and as many query points
INNER_LR = 0.01     # α, the inner SGD step size
TEST_TASKS = 100    # held-out tasks of the final evaluation
TEST_SEED = 1234    # they are the same tasks whatever --seed is

Batch = tuple[Tensor, Tensor]   # (x, y), each of shape (K, 1)


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


def mean_adapted_mse(model: nn.Module, inner_opt: torch.optim.Optimizer, tasks: list[Task],
                     steps: int) -> float:
    return sum(adapted_mse(model, inner_opt, t, steps) for t in tasks) / len(tasks)


def meta_step(solver: gimli.GimliSolver, tasks: list[Task], steps: int) -> None:
    """One MAML update from a meta-batch: ∇_φ (1/B) Σ_i L^val_i(θ'_J), then the meta-optimizer
    (and learned lrs written into inner_opt.param_groups)."""
    solver.step(tasks=[([t.support] * steps, t.query) for t in tasks])


def plot(before: tuple[nn.Module, torch.optim.Optimizer], after: tuple[nn.Module, torch.optim.Optimizer],
         tasks: list[Task], steps: int, path: Path) -> None:
    """Adapted curves on held-out tasks: the truth, the K support points, and the model
    after `steps` SGD steps from the initial weights before and after meta-training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), sharey=True)
    for ax, task in zip(axes, tasks):
        xs, ys = task.support
        amplitude, phase = _fit_sine(task)
        ax.plot(x, amplitude * torch.sin(x + phase), "k-", lw=1, label="task")
        ax.plot(xs, ys, "ko", ms=4, label=f"K = {K} support points")
        for (model, opt), style, name in [(before, "C1--", "before meta-training"),
                                           (after, "C0-", "after meta-training")]:
            adapted = adapt(model, opt, task, steps)
            with torch.no_grad():
                ax.plot(x, adapted(x), style, label=f"adapted, {name}")
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"MAML on sine waves: held-out tasks after {steps} SGD step(s) from θ₀")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit_sine(task: Task) -> tuple[float, float]:
    """The task's amplitude and phase, recovered from its points for drawing: y = a·sin x + b·cos x."""
    x = torch.cat([task.support[0], task.query[0]])
    y = torch.cat([task.support[1], task.query[1]])
    basis = torch.cat([torch.sin(x), torch.cos(x)], 1)
    a, b = torch.linalg.lstsq(basis, y).solution.flatten().tolist()
    return math.hypot(a, b), math.atan2(b, a)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--iterations", type=int, help="meta-iterations (default 2000; quick 40)")
    parser.add_argument("--meta-batch", type=int, help="tasks per meta-iteration (default 8; quick 4)")
    parser.add_argument("--steps", type=int, default=1, help="J, inner SGD steps per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn-lr", action="store_true",
                        help="also meta-learn one inner learning rate per layer")
    parser.add_argument("--out", type=Path, default=FIGURES / "maml_sine.png",
                        help="where to save the figure (default examples/figures/maml_sine.png)")
    args = parser.parse_args(argv)
    iterations = args.iterations or (40 if args.quick else 2000)
    meta_batch = args.meta_batch or (4 if args.quick else 8)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)               # training tasks
    test_tasks = [sample_task(torch.Generator().manual_seed(TEST_SEED + i)) for i in range(TEST_TASKS)]

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    inner_opt = torch.optim.SGD([{"params": m.parameters()} for m in layers], lr=INNER_LR)
    meta = gimli.MetaParams(inner_opt, {"lr": "group"} if args.learn_lr else {}, init=model)
    meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
    solver = gimli.GimliSolver(model, loss_fn, inner_opt, meta, meta_opt=meta_opt, steps=args.steps)

    before = mean_adapted_mse(model, inner_opt, test_tasks, args.steps)
    initial = copy.deepcopy((model, inner_opt))                 # one copy: groups hold its params
    log_every = max(1, iterations // 10)
    bar = tqdm(range(1, iterations + 1), desc="meta-training", disable=args.quick)
    for it in bar:
        tasks = [sample_task(gen) for _ in range(meta_batch)]
        if it == 1 or it % log_every == 0:                      # the batch's L^val(θ'_J), pre-update
            loss = mean_adapted_mse(model, inner_opt, tasks, args.steps)
            bar.set_postfix(query_loss=f"{loss:.4f}")
            if args.quick:
                print(f"iteration {it:5d}  meta-batch query loss {loss:.4f}")
        meta_step(solver, tasks, args.steps)
    after = mean_adapted_mse(model, inner_opt, test_tasks, args.steps)
    plot(initial, (model, inner_opt), test_tasks[:3], args.steps, args.out)

    lrs = [float(g["lr"]) for g in inner_opt.param_groups]
    print(f"post-adaptation MSE on {TEST_TASKS} test tasks ({args.steps} SGD step(s)): "
          f"before {before:.4f}, after {after:.4f}")
    if args.learn_lr:
        print("learned inner lrs per layer: " + ", ".join(f"{lr:.4f}" for lr in lrs))
    print(f"figure: {args.out}")
    return {"before": before, "after": after, "lrs": lrs, "figure": args.out}


if __name__ == "__main__":
    main()
