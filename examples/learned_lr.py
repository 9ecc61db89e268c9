"""Online meta-learned per-layer learning rates for a small CNN on 8×8 digits
(Grefenstette et al. 2019, §5.1 and Figures 1–2, at laptop scale).

scikit-learn's 1,797 handwritten digits are split 80/20 into train and test; the train
part is split again 99:1 into inner-train and a small validation set. Three runs start
from the same initial weights and see the same minibatches, all trained with the real
``torch.optim.SGD`` (momentum 0.9):

1. ``fixed``: one learning rate throughout;
2. ``schedule``: the same optimizer with a hand-set ``MultiStepLR`` (×0.1 at 50 % and
   75 % of the epochs);
3. ``meta``: one learning rate per layer (one param group each), meta-learned online.
   Once per epoch ``GimliSolver.step()`` unrolls J SGD steps from the current weights
   and optimizer state on inner-training minibatches, takes the exact hypergradient of
   the validation loss w.r.t. the four lrs, and updates them with Adam; the epoch is
   then trained with the learned lrs, which ``step()`` wrote into ``opt.param_groups``.

The score, test accuracy per epoch, is computed with plain torch on the held-out test
split and does not go through gimli. This problem is easy: all three runs end within a
few test digits of each other (about 98.5–99 %), and which is ahead changes with
--seed. What the example shows is the learned schedule itself: per-layer lrs that move
apart from their common start, following the hypergradient of a 14-image validation set.
An lr is learned as is (not its log), so Adam's step size, --meta-lr, bounds how fast it
moves; 0.005 keeps the lrs positive in the default runs, and the solver's projection
onto lr ≥ 0, the range ``torch.optim.SGD`` accepts (reported when it holds an lr at 0),
guards other settings. Two figures are written (the paper's Figures 1
and 2): ``learned_lr_accuracy.png`` (test accuracy per epoch of the three runs) and
``learned_lr_lrs.png`` (the learned lr of each layer over the epochs).

    python examples/learned_lr.py            # full run, a few minutes on a CPU
    python examples/learned_lr.py --quick    # the CI run, a few seconds
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

if str(Path(__file__).resolve().parent) not in sys.path:     # _digits.py sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits  # noqa: E402
from _support import OUTPUT, Progress, one_thread, pyplot  # noqa: E402

LR = 0.05           # the fixed run's lr, the schedule's base lr and the learned lrs' start
MOMENTUM = 0.9
BATCH = 32
RUNS = {"fixed": "fixed lr", "schedule": "multi-step schedule",
        "meta": "meta-learned per-layer lrs"}
STYLES: dict[str, dict[str, Any]] = {"fixed": {"lw": 3, "alpha": 0.6}, "schedule": {"ls": "--"},
                                    "meta": {}}     # fixed and schedule may coincide: both visible

Batch = tuple[Tensor, Tensor]   # (x of shape (B, 1, 8, 8), labels of shape (B,))


def make_model() -> nn.Sequential:
    """A small CNN: two 3×3 conv layers with 2×2 max-pooling, then two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 16 × 4 × 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 32 × 2 × 2
        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def layers(model: nn.Sequential) -> dict[str, nn.Module]:
    """The layers with weights, named conv1, conv2, fc1, fc2: one param group each."""
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model if isinstance(m, nn.Linear)]
    return {**{f"conv{i + 1}": m for i, m in enumerate(convs)},
            **{f"fc{i + 1}": m for i, m in enumerate(fcs)}}


def make_opt(model: nn.Sequential, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": m.parameters()} for m in layers(model).values()],
                           lr=lr, momentum=MOMENTUM)


def loss_fn(model: gimli.FunctionalModel | nn.Module, batch: Batch, meta: Any = None) -> Tensor:
    """ℓ = cross-entropy on a batch; also L^val (on the validation split)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch]) -> None:
    """One epoch of the real torch.optim optimizer, at the lrs in opt.param_groups."""
    model.train()
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: _digits.Digits) -> float:
    """Test accuracy with plain torch (the oracle; gimli is not involved)."""
    model.eval()
    return (model(data.x).argmax(1) == data.y).float().mean().item()


def plot(out: Path, acc: dict[str, list[float]], lrs: list[list[float]], names: list[str],
         fixed_lr: float, schedule_lrs: list[float]) -> list[Path]:
    """The paper's Figure 1 (test accuracy per epoch) and Figure 2 (learned lrs); none
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    from matplotlib.ticker import MaxNLocator
    out.mkdir(parents=True, exist_ok=True)
    epochs = list(range(1, len(acc["fixed"]) + 1))

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 4))
    late = len(epochs) // 2                 # the second half, where the runs differ little
    for key, label in RUNS.items():
        ax.plot(epochs, acc[key], marker=".", label=label, **STYLES[key])
        zoom.plot(epochs[late:], acc[key][late:], marker=".", label=label, **STYLES[key])
    ax.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy, CNN on 8×8 digits")
    zoom.set(xlabel="epoch", ylabel="test accuracy", title="Second half of training (zoomed)")
    for a in (ax, zoom):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    acc_path = out / "learned_lr_accuracy.png"
    fig.savefig(acc_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, name in enumerate(names):
        ax.plot(epochs, [row[k] for row in lrs], marker=".", label=f"learned: {name}")
    ax.plot(epochs, [fixed_lr] * len(epochs), "k:", label="fixed lr")
    ax.plot(epochs, schedule_lrs, "k--", alpha=0.5, label="multi-step schedule")
    ax.set(xlabel="epoch", ylabel="learning rate (SGD, momentum 0.9)", yscale="log",
           title="Meta-learned learning rate per layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    lrs_path = out / "learned_lr_lrs.png"
    fig.savefig(lrs_path, dpi=120)
    plt.close(fig)
    return [acc_path, lrs_path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--epochs", type=int, help="training epochs (default 40; quick 4)")
    parser.add_argument("--max-batches", type=int,
                        help="minibatches per epoch (default: all, 44; quick 12)")
    parser.add_argument("--steps", type=int,
                        help="J, inner steps per meta-step (default 10; quick 5)")
    parser.add_argument("--lr", type=float, default=LR,
                        help="the fixed lr, the schedule's base lr and the learned lrs' start")
    parser.add_argument("--meta-lr", type=float, default=5e-3, help="Adam's lr on the learned lrs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUTPUT,
                        help="folder for the PNG figures (default examples/output/)")
    args = parser.parse_args(argv)
    with one_thread():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs or (4 if args.quick else 40)
    max_batches = args.max_batches or (12 if args.quick else None)
    steps = args.steps or (5 if args.quick else 10)

    data = _digits.load()
    train, test = _digits.split(data, (0.8, 0.2), seed=args.seed)
    mean, std = train.x.mean(), train.x.std()          # standardize with the training pixels
    train, test = (_digits.Digits((d.x - mean) / std, d.y) for d in (train, test))
    inner_train, val = _digits.split(train, (0.99, 0.01), seed=args.seed + 1)
    val_batch: Batch = (val.x, val.y)                   # the whole 1 % validation split

    torch.manual_seed(args.seed)
    initial = make_model()                              # the three runs start from these weights
    models = {key: copy.deepcopy(initial) for key in RUNS}
    opts = {key: make_opt(models[key], args.lr) for key in RUNS}
    milestones = [epochs // 2, (3 * epochs) // 4]
    sched = torch.optim.lr_scheduler.MultiStepLR(opts["schedule"], milestones, gamma=0.1)

    meta = gimli.MetaParams(opts["meta"], {"lr": "group"})
    # Each Adam step moves an lr by at most about meta_lr, small enough that the lrs stay
    # positive in the default runs; step()'s projection onto lr ≥ 0 only guards other
    # settings (with --lr 0.02, say, conv2's lr is driven to 0 after 25 epochs).
    meta_opt = torch.optim.Adam(meta.parameters(), lr=args.meta_lr)
    solver = gimli.GimliSolver(models["meta"], loss_fn, opts["meta"], meta,
                               meta_opt=meta_opt, steps=steps)
    names = list(layers(models["meta"]))

    acc: dict[str, list[float]] = {key: [] for key in RUNS}
    lrs: list[list[float]] = []                         # the lrs each epoch of "meta" trained with
    schedule_lrs: list[float] = []
    val_losses: list[float] = []
    clamped = 0
    bar = Progress(range(epochs), desc="epochs", disable=args.quick)
    for epoch in bar:
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        batches = _digits.batches(inner_train, BATCH, gen)[:max_batches]
        if len(batches) < steps:
            raise SystemExit(f"need at least J = {steps} minibatches per epoch, got {len(batches)}")

        # Meta-step: J unrolled steps from the current weights and momentum buffers, on the
        # epoch's first J minibatches; L^val on the validation split; Adam on the lrs.
        result = solver.step(batches[:steps], val_batch)
        val_losses.append(result.val_loss)
        clamped += bool((meta.hyper("lr") == 0).any())     # an lr the projection holds at 0
        lrs.append([float(g["lr"]) for g in opts["meta"].param_groups])
        schedule_lrs.append(float(opts["schedule"].param_groups[0]["lr"]))

        for key in RUNS:                # the same minibatches for every run
            train_epoch(models[key], opts[key], batches)
            acc[key].append(accuracy(models[key], test))
        sched.step()
        bar.set_postfix({key: f"{acc[key][-1]:.3f}" for key in RUNS})

    figures = plot(args.out, acc, lrs, names, args.lr, schedule_lrs)
    final = {key: acc[key][-1] for key in RUNS}

    print(f"\n{'run':<28}{'final test acc':>15}{'best':>8}")
    for key, label in RUNS.items():
        print(f"{label:<28}{final[key]:>15.4f}{max(acc[key]):>8.4f}")
    print(f"learned lrs per layer (start {args.lr}): "
          + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, lrs[-1])))
    if clamped:
        print(f"(step()'s projection onto lr ≥ 0 held a learned lr at 0 in {clamped} meta-step(s))")
    if figures:
        print("figures: " + ", ".join(str(p) for p in figures))
    return {"final": final, "accuracy": acc, "lrs": lrs, "layers": names, "initial_lr": args.lr,
            "schedule_lrs": schedule_lrs, "val_losses": val_losses, "clamped": clamped,
            "figures": figures}


if __name__ == "__main__":
    main()
