r"""A learned optimizer (the paper's §3.1, "learning the optimizer wholesale").

Each element's update comes from a small network on its gradient and momentum:

.. math::
    \begin{aligned}
    m' &= \beta\,m + (1-\beta)\,g                      && (L1) \\
    u  &= f_\psi(g, m') \quad \text{elementwise}         && (L2) \\
    \theta' &= \theta - \gamma\,u                        && (L3)
    \end{aligned}

The network's weights ψ are φ^opt: declare ``MetaParams(opt, {"net": "scalar"})``
(and ``"lr"``, ``"beta"`` if wanted) and the same solver meta-trains them. The
rule has no closed-form VJP: the engine takes the four cotangents by autograd on
the single step, inside the hand-written sweep (proofs/learned.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import _pieces as pc
from ._core import BETA, NONNEGATIVE, group_float
from ._rule import Rule

HYPERS = ("lr", "beta")     # and the module-valued "net", one hyperparameter per weight
RANGES = {"lr": NONNEGATIVE, "beta": BETA}     # as LearnedOptimizer's constructor checks them


class Flags(NamedTuple):
    net: nn.Module          # the architecture; its weights come in through hp


class State(NamedTuple):
    momentum: Tensor


def default_net(hidden: int = 16) -> nn.Module:
    """A per-element MLP (g, m') ↦ u, initialised near u = g (plain SGD)."""
    head = nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.zero_()
    return nn.Sequential(_Skip(nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), head)))


class _Skip(nn.Module):
    """u = g + net(g, m'): the network learns a correction to SGD."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features: Tensor) -> Tensor:
        return features[..., :1] + self.net(features)


def read_group(group: dict[str, Any]) -> tuple[Flags, dict[str, Any]]:
    return Flags(group["net"]), {"lr": group_float(group, "lr"), "beta": group_float(group, "beta"),
                                 "net": group["net"]}


def read_state(torch_state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> State:
    m = torch_state.get("momentum")
    return State(torch.zeros_like(param) if m is None else m.detach().clone())


def _network(net: nn.Module, weights: dict[str, Tensor], g: Tensor, m1: Tensor) -> Tensor:
    """(L2) u = f_ψ(g, m'), element by element, in the wider of the features' and the
    weights' dtypes (a bfloat16 network stepping a bfloat16 model stays bfloat16; the
    VJP, taken on float32 features, runs it in float32)."""
    features = torch.stack([g, m1], -1)
    dtype = features.dtype
    for w in weights.values():
        if w.is_floating_point():
            dtype = torch.promote_types(dtype, w.dtype)
    weights = {k: w.to(dtype) if w.is_floating_point() else w for k, w in weights.items()}
    return functional_call(net, weights, (features.to(dtype),))[..., 0]


def step(flags: Flags, p: Tensor, s: State, g: Tensor, hp: dict[str, Tensor]) -> tuple[Tensor, State]:
    lr, beta = hp["lr"], hp["beta"]
    weights = {k[len("net."):]: v for k, v in hp.items() if k.startswith("net.")}
    m1 = pc.ema(s.momentum, g, beta).to(s.momentum.dtype)           # (L1), stored as m (a float32
                                                                    # β per element of a bfloat16 model)
    u = _network(flags.net, weights, g, m1)                         # (L2)
    return p - lr * u, State(m1)                                    # (L3)


# No closed-form VJP: autograd on the single step. The network acts per element, so the
# rule runs once over the concatenation of a call's tensors; the weights ``net.<name>`` are
# not in ``hypers``: each is one tensor shared by every element of the call.
RULE = Rule(hypers=HYPERS, ranges=RANGES, read_group=read_group, read_state=read_state,
            step=step, elementwise=True)


class LearnedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim`` optimizer whose update is ``net`` (default :func:`gimli.optim.learned.default_net`).

    It steps with the very function gimli differentiates, so a meta-trained
    network is used as it is in the user's own training loop.

    Its ``state_dict()`` holds the network's weights (tensors), not the module, so it
    loads with ``torch.load(..., weights_only=True)``; ``load_state_dict`` copies them
    into the network it already has, which stays the very module gimli meta-learns.
    """

    def __init__(self, params: Iterable[Any], net: nn.Module | None = None, lr: float = 1e-2,
                 beta: float = 0.9):
        if lr not in RANGES["lr"]:
            raise ValueError(f"Invalid learning rate: {lr} (must be ≥ 0)")
        if beta not in RANGES["beta"]:
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        super().__init__(params, dict(lr=lr, beta=beta, net=default_net() if net is None else net))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["param_groups"] = [{**saved, "net": {k: v.detach().clone() for k, v in
                                                   group["net"].state_dict().items()}}
                                 for saved, group in zip(state["param_groups"], self.param_groups)]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [group.get("net") for group in state_dict["param_groups"]]
        for weights, group in zip(saved, self.param_groups):
            if isinstance(weights, nn.Module):
                weights = weights.state_dict()
            group["net"].load_state_dict(weights)          # checked first: names and shapes
        nets = [group["net"] for group in self.param_groups]
        super().load_state_dict({**state_dict, "param_groups": [
            {**group, "net": None} for group in state_dict["param_groups"]]})
        for group, net in zip(self.param_groups, nets):
            group["net"] = net                             # the very module, not a copy

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from . import bind      # (gimli.optim imports this module)
        inner = bind(self)      # the very step gimli's unroll takes, in the same calls
        grads: list[Tensor | None] = [p.grad for p in inner.params]
        if all(g is None for g in grads):
            return loss
        new_params, new_state = inner.step(inner.params, inner.read_state(), grads,
                                           inner.constant_hypers())
        for p, g, new, m in zip(inner.params, grads, new_params, new_state.momentum):
            if g is not None:
                p.copy_(new)
                self.state[p]["momentum"] = m
        return loss
