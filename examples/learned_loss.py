"""A meta-learned training loss (ML3: Bechtle et al. 2021, "Meta-Learning via Learned Loss").

φ^loss is a small network ℓ_φ(ŷ, y) = softplus(MLP(ŷ, y)) ≥ 0 of the model's prediction
and the target, averaged over the points of a batch. The inner loop trains a fresh
1-40-40-1 MLP, from a new random initialisation, for J = 20 steps of SGD with ℓ_φ on
K = 20 points of a sine task y = A·sin(x + φ) (A ~ U[0.1, 1], φ ~ U[0, π],
x ~ U[−5, 5]) whose training labels are unreliable: each is replaced, with probability
0.3, by noise drawn from U[−3, 3]. L^val is the true loss, the mean squared error on 20
clean validation points of the same task. Meta-training φ with Adam on gimli's exact
hypergradients through the 20 SGD steps finds a loss that trains the model quickly and
ignores the corrupted labels; ``--outliers 0`` runs the clean version, where the target
is just MSE itself.

The final score is independent of gimli: on held-out test tasks, train fresh models
from new random initialisations (the same seeds for every loss) with the real
``torch.optim.SGD`` using ℓ_φ before and after meta-training, and using the true loss
(MSE) itself, and measure the MSE on 100 clean held-out points of each task. The full
run also plots that test MSE during training (for 2J steps, past the meta-training
horizon) and the learned loss as a function of the residual.

    python examples/learned_loss.py             # full run, a few minutes on a CPU
    python examples/learned_loss.py --quick     # the CI run, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:     # examples/ is not a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support import OUTPUT, Progress, one_thread, pyplot  # noqa: E402

K_TRAIN, K_VAL, K_TEST = 20, 20, 100   # points per task: to train on, to meta-validate, to score
AMPLITUDE = (0.1, 1.0)                 # A ~ U[0.1, 1]
OUTLIER_RANGE = 3.0                    # a corrupted label is drawn from U[−3, 3]
INNER_LR = 0.1                         # the inner SGD step size, for every loss
META_LR = 1e-2                         # meta-Adam's step on φ
TEST_TASKS = 100                       # held-out tasks of the final evaluation
TEST_SEED = 1234                       # they (and their model inits) are the same whatever --seed is

Batch = tuple[Tensor, Tensor]          # (x, y), each of shape (n, 1)
Loss = Callable[[Tensor, Tensor], Tensor]


class Task(NamedTuple):
    train: Batch                       # K_TRAIN points, labels possibly corrupted
    val: Batch                         # K_VAL clean points
    test: Batch                        # K_TEST clean points


def sample_task(gen: torch.Generator, outliers: float) -> Task:
    """A sine task; each training label is replaced by U[−3, 3] noise with prob. `outliers`."""
    amplitude = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    x = 10.0 * torch.rand(K_TRAIN + K_VAL + K_TEST, 1, generator=gen) - 5.0
    y = amplitude * torch.sin(x + phase)
    noise = OUTLIER_RANGE * (2.0 * torch.rand(K_TRAIN, 1, generator=gen) - 1.0)
    corrupted = torch.rand(K_TRAIN, 1, generator=gen) < outliers
    y_train = torch.where(corrupted, noise, y[:K_TRAIN])
    return Task((x[:K_TRAIN], y_train), (x[K_TRAIN:K_TRAIN + K_VAL], y[K_TRAIN:K_TRAIN + K_VAL]),
                (x[K_TRAIN + K_VAL:], y[K_TRAIN + K_VAL:]))


def build_model(seed: int) -> nn.Sequential:
    """A fresh 1-40-40-1 ReLU MLP whose initial weights depend on `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def build_loss_net() -> nn.Sequential:
    """ℓ_φ's network: (ŷ, y) → a loss ≥ 0 per point (randomly initialised)."""
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 1), nn.Softplus())


def learned_loss(net: nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    """ℓ_φ(ŷ, y) averaged over the batch."""
    return net(torch.cat([pred, target], dim=1)).mean()


def loss_fn(model: gimli.FunctionalModel, batch: Batch, meta: gimli.MetaParams) -> Tensor:
    """Step j's training loss: the learned loss ℓ_φ of the model (at θ'_j) on a batch."""
    x, y = batch
    net = meta["net"]
    assert isinstance(net, nn.Module)       # meta[name] is typed Tensor | Module
    return learned_loss(net, model(x), y)


def val_loss_fn(model: gimli.FunctionalModel, batch: Batch, meta: Any = None) -> Tensor:
    """L^val: the true loss, MSE on clean points. It reads no meta-parameter."""
    x, y = batch
    return F.mse_loss(model(x), y)


def test_curve(loss: Loss, task: Task, seed: int, steps: int) -> list[float]:
    """Test MSE of a fresh model (init from `seed`) after 0, 1, …, `steps` steps of the
    real torch.optim.SGD minimising `loss` on the task's training points."""
    model = build_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    (x, y), (x_test, y_test) = task.train, task.test
    curve = []
    for step in range(steps + 1):
        with torch.no_grad():
            curve.append(F.mse_loss(model(x_test), y_test).item())
        if step < steps:
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
    return curve


def mean_curve(loss: Loss, tasks: list[Task], steps: int) -> list[float]:
    curves = [test_curve(loss, task, TEST_SEED + i, steps) for i, task in enumerate(tasks)]
    return [sum(c[s] for c in curves) / len(curves) for s in range(steps + 1)]


def frozen(net: nn.Module) -> Loss:
    """ℓ_φ with a frozen copy of `net`, as a plain loss function for torch.optim."""
    net = copy.deepcopy(net).requires_grad_(False)
    return lambda pred, target: learned_loss(net, pred, target)


def meta_step(meta: gimli.MetaParams, meta_opt: torch.optim.Optimizer, tasks: list[Task],
              seeds: list[int], steps: int) -> None:
    """One meta-update of φ from a meta-batch of tasks, each training a fresh model: the
    per-task hypergradients averaged (as examples/maml_sine.py does)."""
    grads = []
    for task, seed in zip(tasks, seeds):
        model = build_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        solver = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=val_loss_fn, steps=steps)
        grads.append(solver.hypergradient([task.train] * steps, task.val))
    meta_opt.zero_grad()
    for name, p in meta.named_parameters():
        p.grad = torch.stack([g[name] for g in grads]).mean(0)  # ∇_φ (1/B) Σ_i L^val_i(θ'_J)
    meta_opt.step()


def plot(curves: dict[str, list[float]], initial: nn.Module, learned: nn.Module, steps: int,
         out: Path) -> Path | None:
    """Test MSE while training with each loss, and the losses themselves; None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, curve in curves.items():
        ax1.plot(range(len(curve)), curve, label=label)
    ax1.axvline(steps, color="gray", ls=":", lw=1)
    ax1.set(xlabel="SGD step (torch.optim.SGD)", ylabel="test MSE (clean held-out points)",
            title=f"training fresh models (meta-trained for {steps} steps)", yscale="log")
    ax1.legend()
    residual = torch.linspace(-3, 3, 201).unsqueeze(1)
    for target, ls in ((0.0, "-"), (0.8, "--")):
        y = torch.full_like(residual, target)
        with torch.no_grad():
            for label, net, color in (("initial", initial, "C0"), ("learned", learned, "C1")):
                values = net(torch.cat([y + residual, y], dim=1)).squeeze(1)
                ax2.plot(residual.squeeze(1), values, ls=ls, color=color,
                         label=f"{label} ℓ_φ, y = {target}")
    ax2.plot(residual.squeeze(1), residual.squeeze(1) ** 2, color="gray", lw=1, label="(ŷ − y)²")
    ax2.set(xlabel="residual ŷ − y", ylabel="loss of one point", ylim=(0, 3), title="the loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "learned_loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI (no figure)")
    parser.add_argument("--iterations", type=int, help="meta-iterations (default 500; quick 25)")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--steps", type=int, default=20, help="J, inner SGD steps")
    parser.add_argument("--outliers", type=float, default=0.3,
                        help="probability that a training label is replaced by noise")
    parser.add_argument("--test-tasks", type=int,
                        help=f"held-out tasks (default {TEST_TASKS}; quick 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUTPUT,
                        help="where the figure goes")
    args = parser.parse_args(argv)
    iterations = args.iterations or (25 if args.quick else 500)
    test_count = args.test_tasks or (20 if args.quick else TEST_TASKS)
    horizon = args.steps if args.quick else 2 * args.steps      # the figure looks past J

    with one_thread():
        torch.manual_seed(args.seed)                             # ℓ_φ's initial weights
        gen = torch.Generator().manual_seed(args.seed)           # training tasks and model inits
        test_tasks = [sample_task(torch.Generator().manual_seed(TEST_SEED + i), args.outliers)
                      for i in range(test_count)]
        net = build_loss_net()
        initial = copy.deepcopy(net)
        meta = gimli.MetaParams(loss={"net": net})
        meta_opt = torch.optim.Adam(meta.parameters(), lr=META_LR)

        for _ in Progress(range(iterations), desc="meta-iterations"):
            tasks = [sample_task(gen, args.outliers) for _ in range(args.meta_batch)]
            seeds = [int(torch.randint(2**31, (), generator=gen)) for _ in tasks]
            meta_step(meta, meta_opt, tasks, seeds, args.steps)

        curves = {"initial ℓ_φ": mean_curve(frozen(initial), test_tasks, horizon),
                  "learned ℓ_φ": mean_curve(frozen(net), test_tasks, horizon),
                  "true loss (MSE)": mean_curve(F.mse_loss, test_tasks, horizon)}

    J = args.steps
    result: dict[str, Any] = {"untrained": curves["true loss (MSE)"][0],
                              "initial": curves["initial ℓ_φ"][J],
                              "learned": curves["learned ℓ_φ"][J],
                              "mse": curves["true loss (MSE)"][J]}
    print(f"\ntest MSE on {test_count} held-out tasks after {J} steps of torch.optim.SGD "
          f"(lr {INNER_LR}, {args.outliers:.0%} corrupted training labels):")
    print(f"  no training        {result['untrained']:.4f}")
    for key, label in (("initial", "initial ℓ_φ"), ("learned", "learned ℓ_φ"),
                       ("mse", "true loss (MSE)")):
        print(f"  {label:<18} {result[key]:.4f}")
    if not args.quick:
        figure = plot(curves, initial, net, J, args.out)
        if figure is not None:
            result["figure"] = str(figure)
            print(f"figure: {figure}")
    return result


if __name__ == "__main__":
    main()
