"""Online per-layer learning rates over the whole training run (forward mode,
``horizon="full"``) beside the same learned over J-step windows, on the 8×8 digits.

The short-horizon bias (Wu et al. 2018): a hyperparameter tuned to lower the
validation loss a few steps ahead is not the one that is best for the whole run; a
learning rate tuned on short unrolls tends to shrink. Forward mode can carry the
derivative of the weights with respect to the learning rates along the whole run, so
the hypergradient at each meta-step is that of the validation loss after *all* the
training so far (Franceschi et al. 2017's real-time hyperparameter optimisation).

The same CNN, digits split and minibatches as ``learned_lr.py`` (80/20 train/test; the
train part split 90:10 into inner-train and validation), SGD with momentum 0.9, one lr
per layer. Four runs start from the same weights and see the same minibatches:

1. ``fixed``: one lr throughout (the real ``torch.optim.SGD``);
2. ``schedule``: the same with a ``MultiStepLR`` (×0.1 at 50 % and 75 % of the epochs);
3. ``truncated``: the lrs (log-parametrized) meta-learned online: the epoch's minibatches
   in windows of J steps (the last one shorter), each window one
   ``GimliSolver.step(window, val, commit=True)``: the exact hypergradient of the validation loss after the window's J
   steps, an Adam step on the log-lrs, and the window's steps kept (committed);
4. ``full``: the same, with ``GimliSolver(mode="forward", horizon="full")``: the
   hypergradient of the validation loss after every step trained so far.

Scores, computed with plain torch on the held-out test split: accuracy and
cross-entropy, per epoch and at the end, averaged over ``--seeds`` runs. One figure,
``full_horizon.png``: test accuracy per epoch (mean over seeds) and the learned lrs of
each layer over training (first seed), truncated against full.

    python examples/full_horizon.py            # 3 seeds × 20 epochs, about 2 min on a CPU
    python examples/full_horizon.py --quick    # the CI run, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:     # the examples beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits  # noqa: E402
from _support import OUTPUT, Progress, one_thread, pyplot, save  # noqa: E402
from learned_lr import BATCH, Batch, layers, loss_fn, make_model, make_opt, train_epoch  # noqa: E402

LR = 0.05
RUNS = {"fixed": "fixed lr", "schedule": "multi-step schedule",
        "truncated": "online, J-step windows", "full": "online, full horizon (forward mode)"}


@torch.no_grad()
def score(model: nn.Module, data: _digits.Digits) -> tuple[float, float]:
    """Test accuracy and cross-entropy with plain torch (gimli is not involved)."""
    model.eval()
    out = model(data.x)
    return (out.argmax(1) == data.y).float().mean().item(), F.cross_entropy(out, data.y).item()


def one_seed(args: argparse.Namespace, seed: int, inner: _digits.Digits, val: Batch,
             test: _digits.Digits) -> dict[str, Any]:
    torch.manual_seed(seed)
    initial = make_model()
    models = {key: copy.deepcopy(initial) for key in RUNS}
    opts = {key: make_opt(models[key], args.lr) for key in RUNS}
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opts["schedule"], [args.epochs // 2, (3 * args.epochs) // 4], gamma=0.1)
    solvers = {}
    for key in ("truncated", "full"):
        meta = gimli.MetaParams(opts[key], {"lr": "group"}, transform={"lr": "log"})
        kw: dict[str, Any] = {"mode": "forward", "horizon": "full"} if key == "full" else {}
        solvers[key] = gimli.GimliSolver(models[key], loss_fn, opts[key], meta,
                                         meta_opt=torch.optim.Adam(meta.parameters(), lr=args.meta_lr),
                                         **kw)
    acc: dict[str, list[float]] = {key: [] for key in RUNS}
    loss: dict[str, list[float]] = {key: [] for key in RUNS}
    lrs: dict[str, list[list[float]]] = {"truncated": [], "full": []}     # after each window
    for epoch in Progress(range(args.epochs), desc=f"seed {seed}", disable=args.quick):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        batches = _digits.batches(inner, BATCH, gen)[:args.max_batches]
        for key in ("fixed", "schedule"):
            train_epoch(models[key], opts[key], batches)
        for key, solver in solvers.items():
            models[key].train()
            for k in range(0, len(batches), args.steps):     # (the last window may be shorter)
                solver.step(batches[k:k + args.steps], val, commit=True)
                lrs[key].append([float(g["lr"]) for g in opts[key].param_groups])
        sched.step()
        for key in RUNS:
            a, l = score(models[key], test)
            acc[key].append(a)
            loss[key].append(l)
    return {"accuracy": acc, "loss": loss, "lrs": lrs}


def plot(out: Path, runs: list[dict[str, Any]], names: list[str], start: float) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax, lr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, len(runs[0]["accuracy"]["fixed"]) + 1)
    for key, label in RUNS.items():
        mean = [statistics.mean(r["accuracy"][key][e] for r in runs) for e in range(len(epochs))]
        ax.plot(epochs, mean, marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"Test accuracy (mean of {len(runs)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        for key, style in (("truncated", "--"), ("full", "-")):
            values = [row[k] for row in runs[0]["lrs"][key]]
            lr_ax.plot(range(1, len(values) + 1), values, style, color=colors[k % len(colors)],
                       label=f"{name}, {'full horizon' if key == 'full' else 'J-step windows'}")
    lr_ax.axhline(start, color="k", ls=":", lw=1, label="fixed lr")
    lr_ax.set(xlabel="meta-step (window)", ylabel="learned lr", yscale="log",
              title="Learned lr per layer (first seed)")
    lr_ax.grid(alpha=0.3)
    lr_ax.legend(fontsize="x-small", ncol=2)
    return [save(fig, out, "full_horizon.png")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--epochs", type=int, help="training epochs (default 20; quick 2)")
    parser.add_argument("--max-batches", type=int, help="minibatches per epoch (default: all; quick 12)")
    parser.add_argument("--steps", type=int, help="J, steps per window (default 11; quick 4)")
    parser.add_argument("--seeds", type=int, help="runs averaged (default 3; quick 1)")
    parser.add_argument("--lr", type=float, default=LR, help="the fixed lr and the learned lrs' start")
    parser.add_argument("--meta-lr", type=float, default=0.02, help="Adam's lr on the log-lrs")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="folder for the figure")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 20)
    args.max_batches = args.max_batches or (12 if args.quick else None)
    args.steps = args.steps or (4 if args.quick else 11)
    args.seeds = args.seeds or (1 if args.quick else 3)
    with one_thread():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = _digits.load()
    train, test = _digits.split(data, (0.8, 0.2), seed=0)
    mean, std = train.x.mean(), train.x.std()
    train, test = (_digits.Digits((d.x - mean) / std, d.y) for d in (train, test))
    inner, val = _digits.split(train, (0.9, 0.1), seed=1)
    runs = [one_seed(args, seed, inner, (val.x, val.y), test) for seed in range(args.seeds)]
    names = list(layers(make_model()))
    final = {key: statistics.mean(r["accuracy"][key][-1] for r in runs) for key in RUNS}
    final_loss = {key: statistics.mean(r["loss"][key][-1] for r in runs) for key in RUNS}
    figures = plot(args.out, runs, names, args.lr)
    print(f"\n{'run':<38}{'test acc':>10}{'test loss':>11}   (mean of {args.seeds} seed(s), last epoch)")
    for key, label in RUNS.items():
        print(f"{label:<38}{final[key]:>10.4f}{final_loss[key]:>11.4f}")
    for key in ("truncated", "full"):
        print(f"learned lrs, {RUNS[key]} (first seed): "
              + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, runs[0]["lrs"][key][-1])))
    if figures:
        print("figures: " + ", ".join(str(p) for p in figures))
    return {"final": final, "final_loss": final_loss, "runs": runs, "layers": names,
            "initial_lr": args.lr, "figures": figures}


if __name__ == "__main__":
    main()
