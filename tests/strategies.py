"""Hypothesis strategies shared by the tests: small float64 problems."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st
from torch import nn

from optim_db import OptimRow, granularities, learnable_now

GRANULARITIES = ("scalar", "group", "tensor", "element")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}


class Problem(NamedTuple):
    model: nn.Module
    opt: torch.optim.Optimizer
    train: list[tuple[torch.Tensor, torch.Tensor]]
    val: tuple[torch.Tensor, torch.Tensor]


def mlp(sizes: list[int], activation: str, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).double()


def regression_batches(seed: int, n_in: int, n_out: int, count: int,
                       size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, n_in, generator=g, dtype=torch.float64),
             torch.randn(size, n_out, generator=g, dtype=torch.float64)) for _ in range(count)]


def two_groups(model: nn.Module, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any],
               lr_scale: float) -> torch.optim.Optimizer:
    """The optimizer over two param groups (the first half of the parameter tensors and
    the rest), the second with its own learning rate."""
    params = list(model.parameters())
    half = len(params) // 2
    return cls([{"params": params[:half]}, {"params": params[half:], "lr": kwargs["lr"] * lr_scale}],
               **kwargs)


def mse(model: Any, batch: tuple[torch.Tensor, torch.Tensor], meta: Any = None) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def take_real_steps(problem: Problem, k: int) -> None:
    """k steps of the real optimizer, so the unroll starts from a non-trivial state."""
    for batch in problem.train[:k]:
        problem.opt.zero_grad()
        mse(problem.model, batch).backward()
        problem.opt.step()
    problem.opt.zero_grad(set_to_none=True)


@st.composite
def problems(draw: st.DrawFn, row: OptimRow, max_steps: int = 8) -> tuple[Problem, dict[str, Any], int]:
    """A random MLP, optimizer (flags, hyperparameters, two param groups) and data."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    depth = draw(st.integers(2 if row.matrices_only else 1, 3))
    sizes = [draw(st.integers(1, 4))] + [draw(st.integers(2, 5)) for _ in range(depth - 1)] \
        + [draw(st.integers(1, 2))]
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    model = mlp(sizes, activation, bias=not row.matrices_only)
    kwargs = draw(row.kwargs)
    opt = two_groups(model, row.cls, kwargs, draw(st.one_of(st.just(1.0), st.floats(0.5, 2.0))))
    steps = draw(st.integers(1, max_steps))
    pre = draw(st.integers(0, 2))
    batches = regression_batches(seed, sizes[0], sizes[-1], steps + pre + 1)
    problem = Problem(model, opt, batches[pre:pre + steps], batches[-1])
    take_real_steps(Problem(model, opt, batches[:pre], batches[-1]), pre)
    return problem, kwargs, steps


@st.composite
def meta_choices(draw: st.DrawFn, row: OptimRow, kwargs: dict[str, Any],
                 opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Which meta-parameters to learn: lr alone, betas/momentum, loss parameters,
    θ₀, or everything, each hyperparameter at a random granularity (a scalar lr
    only where the param groups agree on it)."""
    learnable = learnable_now(row, opt)
    kind = draw(st.sampled_from(["lr", "second", "loss", "init", "all"]))
    second = tuple(n for n in learnable if n in ("beta1", "beta2", "momentum", "dampening",
                                                  "lr_decay")) or learnable[1:2]
    names: tuple[str, ...] = {
        "lr": ("lr",), "second": second, "loss": (), "init": (), "all": learnable,
    }[kind]
    groups_agree = len({group["lr"] for group in opt.param_groups}) == 1
    return dict(hypers={n: draw(st.sampled_from([g for g in granularities(opt, n)
                                                 if n != "lr" or groups_agree or g != "scalar"]))
                        for n in names},
                loss=kind in ("loss", "all"), init=kind in ("init", "all"))
