"""The four benchmark problems, each built for an unroll length J.

A task is written once, library-neutrally: a model, the real ``torch.optim``
optimizer over it, a training loss ℓ(forward, params, batch, φ^loss) and a
validation loss, J training batches and one validation batch, and what is
meta-learned (``kind``):

* ``"init"``: the initial weights θ₀ (MAML);
* ``"lr"``: the optimizer's learning rate, one per entry of ``lr_groups``
  (a group of parameter names; one name per group = one lr per tensor);
* ``"loss"``: the φ^loss tensors in ``phi_loss``, read by the training loss.

``methods.py`` turns an :class:`Instance` into one hypergradient computation
per library (gimli's memory modes, the full autograd unroll, higher, torchopt)
and into the plain training unroll that is the time unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
Forward = Callable[[Tensor], Tensor]
# ℓ(forward, named parameters θ, batch, φ^loss) and L^val(forward, batch)
TrainLoss = Callable[[Forward, dict[str, Tensor], Batch, dict[str, Tensor]], Tensor]
ValLoss = Callable[[Forward, Batch], Tensor]


@dataclass
class Instance:
    """One (task, J) problem, built and ready; every method reads the same one."""

    model: nn.Module
    opt_class: type[torch.optim.Optimizer]      # torch.optim.SGD or torch.optim.Adam
    opt_kwargs: dict[str, Any]                  # its settings (lr is the initial value of a learned lr)
    lr_groups: list[list[str]]                  # the param groups (parameter names), in model order
    loss: TrainLoss
    val_loss: ValLoss
    train: list[Batch]
    val: Batch
    kind: str                                   # "init" | "lr" | "loss"
    granularity: str = ""                       # for kind "lr": gimli's "tensor" or "group"
    phi_loss: dict[str, Tensor] = field(default_factory=dict)

    def make_opt(self, model: nn.Module) -> torch.optim.Optimizer:
        """The real torch.optim optimizer over ``model`` (a copy of ``self.model``, or it)."""
        by_name = dict(model.named_parameters())
        groups = [{"params": [by_name[n] for n in g]} for g in self.lr_groups]
        return self.opt_class(groups, **self.opt_kwargs)

    def state_factor(self) -> int:
        """|σ| / |θ|: optimizer-state tensors kept per parameter tensor."""
        if self.opt_class is torch.optim.Adam:
            return 2                                # exp_avg, exp_avg_sq
        return 1 if self.opt_kwargs.get("momentum", 0) else 0


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    steps: tuple[int, ...]          # the J of a full run
    quick_steps: tuple[int, ...]    # the J of --quick
    build: Callable[[int], Instance]


# --- losses --------------------------------------------------------------------------
def val_mse(forward: Forward, batch: Batch) -> Tensor:
    x, y = batch
    return F.mse_loss(forward(x), y)


def mse(forward: Forward, params: dict[str, Tensor], batch: Batch, phi: dict[str, Tensor]) -> Tensor:
    return val_mse(forward, batch)          # the training loss reads no meta-parameter


def val_cross_entropy(forward: Forward, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(forward(x), y)


def cross_entropy(forward: Forward, params: dict[str, Tensor], batch: Batch,
                  phi: dict[str, Tensor]) -> Tensor:
    return val_cross_entropy(forward, batch)


def cross_entropy_l2(forward: Forward, params: dict[str, Tensor], batch: Batch,
                     phi: dict[str, Tensor]) -> Tensor:
    """Cross-entropy + Σ_l exp(log_l2[l])·‖W_l‖², one coefficient per layer's weight."""
    x, y = batch
    weights = [p for n, p in params.items() if n.endswith("weight")]
    l2 = phi["log_l2"].exp()
    return F.cross_entropy(forward(x), y) + sum(c * (w * w).sum() for c, w in zip(l2, weights))


# --- models and data -------------------------------------------------------------------
def mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def classification_batches(gen: torch.Generator, n: int, shape: tuple[int, ...],
                           classes: int = 10) -> list[Batch]:
    return [(torch.randn(*shape, generator=gen), torch.randint(classes, (shape[0],), generator=gen))
            for _ in range(n)]


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


# --- the tasks -------------------------------------------------------------------------
def maml_sine(J: int) -> Instance:
    """MAML: θ₀ of a 1-40-40-1 ReLU MLP through J SGD steps (lr 0.01) on one sine task's
    K = 10 support points (the same batch each step); L^val on 10 query points."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = mlp([1, 40, 40, 1], nn.ReLU)
    amplitude, phase = 0.1 + 4.9 * torch.rand((), generator=gen), math.pi * torch.rand((), generator=gen)
    x = 10.0 * torch.rand(20, 1, generator=gen) - 5.0
    y = amplitude * torch.sin(x + phase)
    support, query = (x[:10], y[:10]), (x[10:], y[10:])
    return Instance(model, torch.optim.SGD, {"lr": 0.01}, [names(model)], mse, val_mse,
                    [support] * J, query, "init")


def adam_lrs(J: int) -> Instance:
    """One learning rate per parameter tensor (6) of a 32-128-128-10 tanh MLP under Adam
    (lr 1e-3), cross-entropy on random data, batch 64."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = mlp([32, 128, 128, 10], nn.Tanh)
    batches = classification_batches(gen, J + 1, (64, 32))
    return Instance(model, torch.optim.Adam, {"lr": 1e-3}, [[n] for n in names(model)],
                    cross_entropy, val_cross_entropy, batches[:J], batches[J], "lr", "tensor")


def l2_momentum(J: int) -> Instance:
    """Per-layer L2 coefficients (3 log-coefficients, φ^loss) of the same MLP under SGD
    with momentum 0.9 (lr 0.05); L^val is the plain cross-entropy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = mlp([32, 128, 128, 10], nn.Tanh)
    batches = classification_batches(gen, J + 1, (64, 32))
    return Instance(model, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, [names(model)],
                    cross_entropy_l2, val_cross_entropy, batches[:J], batches[J], "loss",
                    phi_loss={"log_l2": torch.full((3,), -6.0)})


def cnn(J: int) -> Instance:
    """One learning rate per layer (4 param groups) of a small ReLU CNN under Adam
    (lr 1e-3): conv 1→16 (28×28), conv 16→32 stride 2 (14×14), conv 32→32 stride 2
    (7×7), linear 1568→10; random 1×28×28 images, batch 32."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    layers = [[n for n in names(model) if n.startswith(f"{i}.")] for i in (0, 2, 4, 7)]
    batches = classification_batches(gen, J + 1, (32, 1, 28, 28))
    return Instance(model, torch.optim.Adam, {"lr": 1e-3}, layers, cross_entropy,
                    val_cross_entropy, batches[:J], batches[J], "lr", "group")


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("maml_sine", "MAML on sine waves: θ₀ of a 1-40-40-1 ReLU MLP, SGD lr 0.01, K = 10",
         (5, 20, 80, 160), (5, 20), maml_sine),
    Task("adam_lrs", "per-tensor lrs (6) of a 32-128-128-10 tanh MLP under Adam, batch 64",
         (5, 20, 80, 160), (5, 20), adam_lrs),
    Task("l2_momentum", "per-layer L2 log-coefficients (3, φ^loss), same MLP, SGD momentum 0.9",
         (5, 20, 80, 160), (5, 20), l2_momentum),
    Task("cnn_adam", "per-layer lrs (4 groups) of a 3-conv ReLU CNN (16-32-32 ch, 28×28, "
         "batch 32) under Adam", (5, 20, 40, 80), (5, 20), cnn),
]}
