"""One small problem per optimizer of ``gimli.optim.capabilities()``: a tanh MLP (bias-free
for Muon, which steps matrices only) and the optimizer at typical settings (every option
that keeps a hyperparameter in play on, gimli/optim/_settings.py) over two param groups,
the second with its own lr unless the granularity is 'scalar' (one value for all)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gimli
from gimli.optim._settings import TYPICAL
from gimli.optim.learned import default_net
from strategies import mlp

SETTINGS: dict[str, dict[str, Any]] = TYPICAL


def optimizer_class(name: str) -> Any:
    if name == "LearnedOptimizer":
        return lambda params, **kw: gimli.LearnedOptimizer(params, net=default_net().double(), **kw)
    return getattr(torch.optim, name)


def setup(name: str, per: str, settings: dict[str, Any] | None = None, dtype: torch.dtype = torch.float64,
          seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = mlp([3, 4, 2], "tanh", bias=name != "Muon").to(dtype)
    kwargs = dict(SETTINGS[name] if settings is None else settings)
    params = list(model.parameters())
    half = len(params) // 2
    second = {} if per == "scalar" else {"lr": kwargs["lr"] * 0.5}
    return model, optimizer_class(name)([{"params": params[:half]}, {"params": params[half:], **second}],
                                        **kwargs)


def corrupt_lr(monkeypatch: Any, module: Any, scale: float) -> None:
    """Scale the lr cotangent of an optimizer file's VJP (a wrong hypergradient), for every
    optimizer class bound to it from now on."""
    from dataclasses import replace

    from gimli.optim import SUPPORTED

    rule = module.RULE
    original = rule.vjp

    def corrupted(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if "lr" in out.hypers:
            out.hypers["lr"] = scale * out.hypers["lr"]
        return out

    wrong = replace(rule, vjp=corrupted)
    for cls, bound in list(SUPPORTED.items()):
        if bound is rule:
            monkeypatch.setitem(SUPPORTED, cls, wrong)
