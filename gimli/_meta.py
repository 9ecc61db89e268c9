"""The meta-parameter container φ = (φ^opt, φ^loss, θ₀): Algorithm 1's split and join."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .optim import InnerOptimizer, bind

GRANULARITIES = ("scalar", "group", "tensor", "element")


class MetaParams(nn.Module):
    """Declares what is meta-learned; ``.parameters()`` feeds the meta-optimizer.

    Args:
        optimizer: the inner ``torch.optim`` optimizer whose hyperparameters are
            learned (needed only when ``hypers`` is given).
        hypers: φ^opt, hyperparameter name → granularity, one of ``"scalar"``
            (one value), ``"group"`` (one per param group), ``"tensor"`` (one per
            parameter tensor) or ``"element"`` (one per parameter element); a
            plain list of names means ``"scalar"``. Names are those of the
            optimizer's param groups, with Adam's ``betas`` split into ``beta1``
            and ``beta2``. Initial values are read from ``optimizer.param_groups``
            (``lr`` from ``initial_lr`` where an LR scheduler is attached: its base lr).
            A module-valued hyperparameter (``LearnedOptimizer``'s ``"net"``) takes
            ``"scalar"`` and contributes its own weights.
        loss: φ^loss, name → tensor or ``nn.Module``, read by ``loss_fn`` as
            ``meta[name]``. A tensor is wrapped as an ``nn.Parameter`` (sharing
            its storage); a module contributes all its parameters.
        init: the model itself, to meta-learn its initial weights θ₀ (MAML). The
            meta-parameters are then the model's own parameters.

    Parameters are named ``hypers.<name>``, ``loss.<name>[.<sub>]`` and
    ``init.<model parameter name>``; hypergradients are keyed the same way.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None,
                 hypers: Mapping[str, str] | Iterable[str] = (), *,
                 loss: Mapping[str, Tensor | nn.Module] | None = None,
                 init: nn.Module | None = None):
        super().__init__()
        granularity = dict(hypers) if isinstance(hypers, Mapping) else dict.fromkeys(hypers, "scalar")
        if granularity and optimizer is None:
            raise ValueError("MetaParams: pass the inner optimizer to meta-learn its hyperparameters")
        self.inner: InnerOptimizer | None = None if optimizer is None else bind(optimizer)
        self.granularity: dict[str, str] = {}
        self.hypers = nn.Module()
        modules = {} if self.inner is None else self.inner.module_hypers()
        for name, per in granularity.items():
            assert self.inner is not None
            if name in modules:                 # a learned optimizer's network: its own weights
                if per != "scalar":
                    raise ValueError(f"{name!r} is a module shared by every tensor: its granularity "
                                     f"is 'scalar', not {per!r}")
                self.hypers.add_module(name, modules[name])
                self.granularity.update({f"{name}.{n}": "scalar"
                                         for n, _ in modules[name].named_parameters()})
                continue
            self.hypers.register_parameter(name, nn.Parameter(_initial_value(self.inner, name, per)))
            self.granularity[name] = per
        self.loss = nn.Module()
        self._loss_entries: dict[str, Tensor | nn.Module] = {}
        for name, value in (loss or {}).items():
            if isinstance(value, nn.Module):
                self.loss.add_module(name, value)
            elif isinstance(value, Tensor):
                if not value.is_floating_point():
                    raise TypeError(f"MetaParams: loss entry {name!r} must be a floating-point tensor")
                value = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
                self.loss.register_parameter(name, value)
            else:
                raise TypeError(f"MetaParams: loss entry {name!r} must be a tensor or an nn.Module, "
                                f"not {type(value).__name__}")
            self._loss_entries[name] = value
        self.init = init

    def __getitem__(self, name: str) -> Tensor | nn.Module:
        """The φ^loss entry ``name``, as ``loss_fn`` reads it."""
        try:
            return self._loss_entries[name]
        except KeyError:
            raise KeyError(f"no loss meta-parameter {name!r}; declared: "
                           f"{sorted(self._loss_entries)}") from None

    def hyper(self, name: str) -> Tensor:
        """The meta-parameter holding hyperparameter ``name``."""
        return self.hypers.get_parameter(name)

    def expand(self, name: str) -> list[Tensor]:
        """Hyperparameter ``name`` as one tensor per parameter tensor (0-dim or the
        parameter's shape), in the optimizer's order; differentiable."""
        assert self.inner is not None
        value, per, params = self.hyper(name), self.granularity[name], self.inner.params
        shape = {"scalar": (), "group": (len(self.inner.groups),), "tensor": (len(params),),
                 "element": (sum(p.numel() for p in params),)}[per]
        if "." not in name and tuple(value.shape) != shape:     # (a module's weights: their own)
            raise ValueError(f"meta-parameter hypers.{name} has shape {tuple(value.shape)}, but "
                             f"{per!r} granularity over this optimizer needs {shape}")
        if per == "scalar":
            return [value] * len(params)
        if per == "group":
            return [value[g] for g in self.inner.group_of()]
        if per == "tensor":
            return list(value.unbind())
        return [v.view_as(p) for v, p in zip(value.split([p.numel() for p in params]), params)]

    def hyper_values(self, name: str) -> list[Tensor]:
        """Hyperparameter ``name`` per parameter tensor, detached (to inspect or plot)."""
        return [v.detach() for v in self.expand(name)]

    def constrain_(self) -> None:
        """Put every meta-parameter back into its valid set after a meta-update (in place)."""

    def write_back(self) -> None:
        """Write scalar and per-group hyperparameters into the optimizer's param_groups,
        so the user's own training loop uses the meta-learned values."""
        if self.inner is None:
            return
        for name, per in self.granularity.items():
            if per not in ("scalar", "group") or "." in name:     # a module's own weights
                continue
            value = self.hyper(name).detach()
            for g, group in enumerate(self.inner.torch_optimizer.param_groups):
                _set_group_value(self.inner, group, name, float(value if per == "scalar" else value[g]))


def _initial_value(inner: InnerOptimizer, name: str, per: str) -> Tensor:
    if name not in inner.hyper_names:
        raise ValueError(f"{inner.name} has no differentiable hyperparameter {name!r}; "
                         f"its hyperparameters are {', '.join(inner.hyper_names)}")
    allowed = getattr(inner.rule, "GRANULARITIES", {}).get(name, GRANULARITIES)
    if per not in allowed:
        raise ValueError(f"granularity of {name!r} for {inner.name} must be one of {allowed}, "
                         f"not {per!r}")
    unread = getattr(inner.rule, "NO_HYPERGRADIENT", {})
    if name in unread:
        raise ValueError(f"{name} cannot be meta-learned with {inner.name}: {unread[name]}, so "
                         f"the hypergradient of a loss on θ is identically 0")
    inactive = getattr(inner.rule, "inactive_hypers", None)
    for g, flags in enumerate(inner.flags):
        if inactive is not None and name in inactive(flags):
            raise ValueError(f"{name} has no effect in param group {g} of {inner.name} "
                             f"({inactive.__doc__}); build the optimizer so that it is used "
                             f"before meta-learning it")
    groups = inner.group_hypers()
    per_group = [float(groups[g][name]) for g in range(len(groups))]
    torch_groups = inner.torch_optimizer.param_groups
    if name == "lr" and all("initial_lr" in g for g in torch_groups):
        per_group = [float(g["initial_lr"]) for g in torch_groups]    # an LR scheduler's base lr
    ref = inner.params[0]
    kw: dict[str, Any] = {"dtype": ref.dtype, "device": ref.device}
    if per == "scalar":
        if len(set(per_group)) > 1:
            raise ValueError(f"{name} differs between param groups ({per_group}); "
                             f"meta-learn it per 'group' or make the groups agree")
        return torch.tensor(per_group[0], **kw)
    if per == "group":
        return torch.tensor(per_group, **kw)
    per_tensor = [per_group[g] for g in inner.group_of()]
    if per == "tensor":
        return torch.tensor(per_tensor, **kw)
    return torch.cat([torch.full((p.numel(),), v, **kw) for p, v in zip(inner.params, per_tensor)])


def _set_group_value(inner: InnerOptimizer, group: dict[str, Any], name: str, value: float) -> None:
    key, index = getattr(inner.rule, "GROUP_KEYS", {}).get(name, (name, None))
    if index is None:
        group[key] = value
    else:
        entry = list(group[key])
        entry[index] = value
        group[key] = tuple(entry)
