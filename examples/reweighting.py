"""Learning to reweight training examples (data hyper-cleaning) on 8×8 digits with 40 % of
the training labels corrupted.

A standard bilevel benchmark (Franceschi et al. 2017; Ren et al. 2018): every training
example i has a weight w_i = sigmoid(φ_i), and the training loss is the weighted mean
cross-entropy; the weights are meta-learned so that training on them lowers the loss on
a small *clean* validation set. Examples with a wrong label should end with small
weights.

**The recipe** (the indexing pattern): let each batch carry its examples' indices into
the training set, ``(x, y, idx)``, make the per-example logits one ``loss=`` entry of
``MetaParams`` (a vector of N), and read ``meta["logits"][idx]`` in ``loss_fn``. The
validation loss ignores the weights. Here the logits are learned online: the training
set in windows of J steps, each ``GimliSolver.step(window, val, commit=True)``.

Scores, all with plain torch: the mean learned weight of clean and of corrupted
examples; the AUC of the weights as a detector of clean labels (the probability that a
clean example outweighs a corrupted one); and the test accuracy of a model retrained
from scratch with plain ``torch.optim`` on the learned weights, against one trained on
the noisy data unweighted and one on the clean examples alone (the oracle's bound). One
figure, ``reweighting.png``: the learned weights of clean and corrupted examples, and
the three test accuracies.

    python examples/reweighting.py            # about a minute on a CPU
    python examples/reweighting.py --quick    # the CI run, a few seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:     # the examples beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits  # noqa: E402
from _support import OUTPUT, Progress, one_thread, pyplot, save  # noqa: E402

Batch = tuple[Tensor, Tensor, Tensor]       # images, labels, their indices in the training set


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def corrupt(y: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Labels with ``fraction`` of them replaced by a different, random class; and which."""
    bad = torch.rand(len(y), generator=gen) < fraction
    shift = torch.randint(1, 10, (len(y),), generator=gen)
    return torch.where(bad, (y + shift) % 10, y), bad


def weighted_loss(model: Any, batch: Batch, meta: gimli.MetaParams) -> Tensor:
    """ℓ: the cross-entropy of each example times its weight sigmoid(φ_i), averaged."""
    x, y, idx = batch
    w = torch.sigmoid(meta["logits"][idx])                      # type: ignore[index]
    return (w * F.cross_entropy(model(x), y, reduction="none")).mean()


def val_loss(model: Any, batch: Batch, meta: gimli.MetaParams) -> Tensor:
    """L^val: plain cross-entropy on the clean validation set (no weights)."""
    x, y, _ = batch
    return F.cross_entropy(model(x), y)


def train_plain(x: Tensor, y: Tensor, weights: Tensor, args: argparse.Namespace, seed: int) -> nn.Module:
    """Training from scratch with plain torch on fixed example weights (the score's model)."""
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.epochs):
        for bx, by, idx in _digits.batches(_digits.Digits(x, y), args.batch,
                                           torch.Generator().manual_seed(seed * 100 + epoch), indices=True):
            opt.zero_grad()
            (weights[idx] * F.cross_entropy(model(bx), by, reduction="none")).mean().backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def auc(scores: Tensor, positive: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half
    (the Mann–Whitney statistic)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def plot(out: Path, weights: Tensor, bad: Tensor, acc: dict[str, float]) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(10, 4))
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(weights[~bad].tolist(), bins=bins, alpha=0.7, label=f"clean labels ({int((~bad).sum())})")
    ax.hist(weights[bad].tolist(), bins=bins, alpha=0.7, label=f"corrupted labels ({int(bad.sum())})")
    ax.set(xlabel="learned weight sigmoid(φ_i)", ylabel="training examples",
           title="Learned example weights")
    ax.legend()
    names = [name.replace(", ", ",\n") for name in acc]
    bar.bar(names, list(acc.values()), color=["C7", "C2", "C0"])
    for i, value in enumerate(acc.values()):
        bar.text(i, value + 0.005, f"{value:.3f}", ha="center")
    bar.set(ylabel="test accuracy", ylim=(min(acc.values()) - 0.05, 1.0),
            title="Retrained from scratch with plain torch")
    return [save(fig, out, "reweighting.png")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--epochs", type=int, help="epochs of meta-learning and of retraining (default 30; quick 3)")
    parser.add_argument("--steps", type=int, default=10, help="J, steps per window")
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of training labels corrupted")
    parser.add_argument("--lr", type=float, default=0.05, help="the inner SGD's lr")
    parser.add_argument("--meta-lr", type=float, default=0.3, help="Adam's lr on the logits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUTPUT, help="folder for the figure")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.quick else 30)
    with one_thread():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = _digits.load()
    train, test = _digits.split(data, (0.8, 0.2), seed=args.seed)
    train, val = _digits.split(train, (0.9, 0.1), seed=args.seed + 1)      # val: clean labels
    noisy, bad = corrupt(train.y, args.noise, torch.Generator().manual_seed(args.seed + 2))
    n = len(noisy)
    val_batch: Batch = (val.x, val.y, torch.arange(len(val.y)))

    torch.manual_seed(args.seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    meta = gimli.MetaParams(loss={"logits": torch.zeros(n)})   # weights start at 0.5
    solver = gimli.GimliSolver(model, weighted_loss, opt, meta, val_loss_fn=val_loss,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=args.meta_lr))
    for epoch in Progress(range(args.epochs), desc="meta-learning", disable=args.quick):
        epoch_batches = _digits.batches(_digits.Digits(train.x, noisy), args.batch,
                                        torch.Generator().manual_seed(epoch), indices=True)
        for k in range(0, len(epoch_batches), args.steps):
            solver.step(epoch_batches[k:k + args.steps], val_batch, commit=True)

    weights = torch.sigmoid(meta["logits"].detach())            # type: ignore[union-attr]
    clean = ~bad
    scores = {"mean weight, clean": weights[clean].mean().item(),
              "mean weight, corrupted": weights[bad].mean().item(),
              "AUC (clean vs corrupted)": auc(weights, clean)}
    acc = {"noisy, unweighted": accuracy(train_plain(train.x, noisy, torch.ones(n), args, 1), test.x, test.y),
           "noisy, learned weights": accuracy(train_plain(train.x, noisy, weights, args, 1), test.x, test.y),
           "clean examples only": accuracy(train_plain(train.x, noisy, clean.float(), args, 1), test.x, test.y)}
    figures = plot(args.out, weights, bad, acc)
    print(f"\n{n} training examples, {int(bad.sum())} with a corrupted label; "
          f"{len(val.y)} clean validation examples")
    for name, value in {**scores, **{f"test accuracy, {k}": v for k, v in acc.items()}}.items():
        print(f"  {name:<44}{value:.4f}")
    if figures:
        print("figures: " + ", ".join(str(p) for p in figures))
    return {"scores": scores, "accuracy": acc, "weights": weights, "corrupted": bad, "figures": figures}


if __name__ == "__main__":
    main()
