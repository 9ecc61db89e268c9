"""MAML with an SGD or an Adam inner optimizer: the paper's §5.2 ablation in miniature.

Grefenstette et al. (2019, §5.2, Table 1) ablate MAML++ across model architectures and
inner optimizers, meta-learning per-param-group inner learning rates and, for Adam, its
β coefficients. Here the same four-way comparison runs on few-shot digits: N-way K-shot
tasks (3-way 5-shot, 5 query images per class) from scikit-learn's 8×8 handwritten
digits, meta-training tasks drawn from classes 0–5 and test tasks from the held-out
classes 6–9, the labels permuted in every task. Two models (an MLP on the 64 pixels
and a small CNN) × two inner optimizers (SGD, Adam) give four runs, <model>+<opt> in
the paper's notation. Each meta-learns, with gimli's exact hypergradients through J
inner steps, the initial weights θ₀, one inner lr per layer (a param group per layer)
and, for Adam, one β₁ and one β₂ per layer; the meta-optimizer is Adam. The inner
optimizers start from their textbook settings (SGD lr 0.1; Adam lr 1e-3, β = (0.9,
0.999)), from which a randomly initialised model learns next to nothing in J steps.
The solver keeps the learned values where ``torch.optim.Adam`` accepts them (its
default projection after each meta-step): lrs ≥ 0, betas in [0, 1) (β₂ at most
1 − 2⁻²⁴ in float32; at β₂ ≥ 1 Adam's bias correction 1 − β₂ᵗ is ≤ 0); the
hypergradient drives β₂ to that bound at once (in the full run some layers later
come back below it).

The final score is independent of gimli: on held-out test tasks, copy the model, take
J steps of the real ``torch.optim.SGD`` or ``torch.optim.Adam`` on the support set
with the learned lrs and betas read from the inner optimizer's param groups, and
measure the query accuracy, before and after meta-training. The full run also plots
the learned lrs and betas of every layer over meta-training (cf. the paper's Fig. 2–3).

    python examples/maml_inner_adam.py              # full run, a few minutes on a CPU
    python examples/maml_inner_adam.py --quick      # the CI run, a few seconds
    python examples/maml_inner_adam.py --models mlp --optimizers adam --steps 3
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if str(Path(__file__).resolve().parent) not in sys.path:      # examples/ is not a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits  # noqa: E402
from _support import OUTPUT, Progress, one_thread, pyplot  # noqa: E402

import gimli  # noqa: E402

N_WAY, K_SHOT, N_QUERY = 3, 5, 5        # 3-way 5-shot, 5 query images per class
TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)      # meta-training tasks
TEST_CLASSES = (6, 7, 8, 9)             # held-out classes of the test tasks
INNER_LR = {"sgd": 0.1, "adam": 1e-3}   # initial inner lr of every layer (textbook defaults)
BETAS = (0.9, 0.999)                    # initial inner Adam betas of every layer (torch's default)
META_LR = 1e-3                          # meta-Adam's step on θ₀ and on the betas
HYPER_META_LR = 0.1                     # … and on a learned lr, relative to its initial value
TEST_TASKS = 200                        # held-out tasks of the final evaluation
TEST_SEED = 1234                        # they are the same tasks whatever --seed is

Batch = tuple[Tensor, Tensor]           # (images (n, 1, 8, 8), labels (n,) in 0…N−1)


class Task(NamedTuple):
    support: Batch                      # K_SHOT images per class
    query: Batch                        # N_QUERY images per class


def sample_task(data: _digits.Digits, classes: tuple[int, ...], gen: torch.Generator) -> Task:
    """An N-way task: N classes drawn from ``classes`` in random order (class i of the
    draw gets label i, so labels are permuted per task), K+Q images of each."""
    chosen = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:N_WAY]]
    support, query = [], []
    for label, c in enumerate(chosen):
        idx = torch.nonzero(data.y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)[:K_SHOT + N_QUERY]]
        support.append((data.x[idx[:K_SHOT]], torch.full((K_SHOT,), label)))
        query.append((data.x[idx[K_SHOT:]], torch.full((N_QUERY,), label)))
    return Task(*((torch.cat([x for x, _ in part]), torch.cat([y for _, y in part]))
                  for part in (support, query)))


def build_model(name: str) -> nn.Sequential:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, N_WAY))
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16×4×4
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16×2×2
                         nn.Flatten(), nn.Linear(64, N_WAY))


def build_inner_opt(model: nn.Sequential, name: str) -> torch.optim.Optimizer:
    """The inner optimizer, one param group per layer (so lrs and betas are per layer)."""
    groups: list[dict[str, Any]] = [{"params": list(layer.parameters())}
                                    for layer in model if any(True for _ in layer.parameters())]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=INNER_LR["sgd"])
    return torch.optim.Adam(groups, lr=INNER_LR["adam"], betas=BETAS)


def loss_fn(model: gimli.FunctionalModel, batch: Batch, meta: gimli.MetaParams) -> Tensor:
    """ℓ = cross-entropy of the model (at θ'_j) on a batch; also used as L^val."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def adapted_accuracy(model: nn.Module, inner_opt: torch.optim.Optimizer, task: Task,
                     steps: int) -> float:
    """Query accuracy after `steps` steps of the real torch.optim.SGD or torch.optim.Adam
    (as the inner optimizer, from a fresh state) on the support set, taken on a copy of
    the model with the inner optimizer's param groups (learned lrs and betas included)."""
    clone = copy.deepcopy(model)
    twin = {id(p): q for p, q in zip(model.parameters(), clone.parameters())}
    groups = [{**group, "params": [twin[id(p)] for p in group["params"]]}
              for group in inner_opt.param_groups]
    adam = isinstance(inner_opt, torch.optim.Adam)
    opt = torch.optim.Adam(groups) if adam else torch.optim.SGD(groups)
    x, y = task.support
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(clone(x), y).backward()
        opt.step()
    with torch.no_grad():
        x, y = task.query
        return (clone(x).argmax(1) == y).float().mean().item()


def mean_accuracy(model: nn.Module, inner_opt: torch.optim.Optimizer, tasks: list[Task],
                  steps: int) -> float:
    return sum(adapted_accuracy(model, inner_opt, t, steps) for t in tasks) / len(tasks)


def build_meta_opt(meta: gimli.MetaParams) -> torch.optim.Adam:
    """Meta-Adam with a step size per kind of meta-parameter: META_LR for θ₀ and the
    betas, and for the learned lrs a step relative to their initial value (SGD's and
    Adam's differ a hundredfold)."""
    groups: list[dict[str, Any]] = []
    for name, p in meta.named_parameters():
        lr = HYPER_META_LR * p.detach().mean().item() if name == "hypers.lr" else META_LR
        groups.append({"params": [p], "lr": lr})
    return torch.optim.Adam(groups)


def meta_step(solver: gimli.GimliSolver, tasks: list[Task], steps: int) -> None:
    """One MAML update from a meta-batch of tasks: ∇_φ (1/B) Σ_i L^val_i(θ'_J), the
    meta-optimizer's step, the learned values kept in torch.optim's ranges and written
    into inner_opt.param_groups (as examples/maml_sine.py does)."""
    solver.step(tasks=[([t.support] * steps, t.query) for t in tasks])


def learned_hypers(inner_opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    """The inner lrs (and betas) per layer, as the inner optimizer's param groups hold them."""
    out = {"lr": [float(g["lr"]) for g in inner_opt.param_groups]}
    if isinstance(inner_opt, torch.optim.Adam):
        out["beta1"] = [float(g["betas"][0]) for g in inner_opt.param_groups]
        out["beta2"] = [float(g["betas"][1]) for g in inner_opt.param_groups]
    return out


def run(model_name: str, opt_name: str, args: argparse.Namespace, data: _digits.Digits,
        test_tasks: list[Task], bar: Any) -> tuple[dict[str, Any], list[dict[str, list[float]]]]:
    """Meta-train one <model>+<opt> combination: its test accuracy before and after, its
    learned hyperparameters, and their history over the meta-iterations."""
    torch.manual_seed(args.seed)                                 # the same θ₀ for SGD and Adam
    gen = torch.Generator().manual_seed(args.seed)               # the same training tasks too
    model = build_model(model_name)
    inner_opt = build_inner_opt(model, opt_name)
    learned = ("lr",) if opt_name == "sgd" else ("lr", "beta1", "beta2")
    meta = gimli.MetaParams(inner_opt, dict.fromkeys(learned, "group"), init=model)
    meta_opt = build_meta_opt(meta)
    solver = gimli.GimliSolver(model, loss_fn, inner_opt, meta, meta_opt=meta_opt, steps=args.steps)

    before = mean_accuracy(model, inner_opt, test_tasks, args.steps)
    history = [learned_hypers(inner_opt)]
    for _ in range(args.iterations):
        tasks = [sample_task(data, TRAIN_CLASSES, gen) for _ in range(args.meta_batch)]
        meta_step(solver, tasks, args.steps)
        history.append(learned_hypers(inner_opt))
        bar.update()
    after = mean_accuracy(model, inner_opt, test_tasks, args.steps)
    return {"before": before, "after": after, **history[-1]}, history


def plot(histories: dict[str, list[dict[str, list[float]]]], out: Path) -> Path | None:
    """The learned hyperparameters per layer over meta-training (cf. the paper's Fig. 2–3);
    None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None

    models = sorted({key.split("+")[0] for key in histories}, key=["mlp", "cnn"].index)
    fig, axes = plt.subplots(len(models), 3, figsize=(12, 3.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        for key, history in histories.items():
            name, opt = key.split("+")
            if name != model:
                continue
            ls = "-" if opt == "sgd" else "--"
            for panel, hyper in zip(row, ("lr", "beta1", "beta2")):
                if hyper not in history[0]:
                    continue
                values = torch.tensor([h[hyper] for h in history])       # (iterations + 1, layers)
                if hyper == "lr":
                    values = values / INNER_LR[opt]
                for layer in range(values.shape[1]):
                    panel.plot(values[:, layer], ls=ls, color=f"C{layer}",
                               label=f"{opt} layer {layer + 1}")
        row[0].set(title=f"{model}: lr / initial lr", xlabel="meta-iteration")
        row[1].set(title=f"{model}+adam: β₁", xlabel="meta-iteration")
        row[2].set(title=f"{model}+adam: β₂", xlabel="meta-iteration")
        row[2].axhline(1.0, color="gray", ls=":", lw=1)              # Adam's range ends below 1
        row[0].legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "maml_inner_adam.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI (no figure)")
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "adam"], default=["sgd", "adam"])
    parser.add_argument("--iterations", type=int, help="meta-iterations per run (default 200; quick 15)")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--steps", type=int, help="J, inner steps per task (default 5; quick 3)")
    parser.add_argument("--test-tasks", type=int,
                        help=f"held-out test tasks (default {TEST_TASKS}; quick 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUTPUT,
                        help="where the figure goes")
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (15 if args.quick else 200)
    args.steps = args.steps or (3 if args.quick else 5)
    test_count = args.test_tasks or (30 if args.quick else TEST_TASKS)

    with one_thread():
        data = _digits.load()
        test_tasks = [sample_task(data, TEST_CLASSES, torch.Generator().manual_seed(TEST_SEED + i))
                      for i in range(test_count)]
        runs = [(m, o) for m in args.models for o in args.optimizers]
        results: dict[str, Any] = {}
        histories: dict[str, list[dict[str, list[float]]]] = {}
        with Progress(total=len(runs) * args.iterations, desc="meta-iterations") as bar:
            for m, o in runs:
                bar.set_postfix_str(f"{m}+{o}")
                results[f"{m}+{o}"], histories[f"{m}+{o}"] = run(m, o, args, data, test_tasks, bar)

    print(f"\n{N_WAY}-way {K_SHOT}-shot query accuracy on {test_count} test tasks (classes "
          f"{TEST_CLASSES[0]}–{TEST_CLASSES[-1]}) after {args.steps} steps of torch.optim "
          f"on the support set:")
    print(f"{'model+opt':<10} {'before':>7} {'after':>7}   learned hyperparameters per layer")
    for key, r in results.items():
        learned = "lr " + " ".join(f"{v:.3g}" for v in r["lr"])
        for b in ("beta1", "beta2"):
            if b in r:
                learned += f"   {b} " + " ".join(f"{v:.4f}" for v in r[b])
        print(f"{key:<10} {r['before']:7.3f} {r['after']:7.3f}   {learned}")
    figure = None if args.quick else plot(histories, args.out)
    if figure is not None:
        print(f"figure: {figure}")
    return results


if __name__ == "__main__":
    main()
