"""The user's model seen as a function of its parameters (never modified)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call


class FunctionalModel:
    """What ``loss_fn`` and ``val_loss_fn`` receive as ``model``.

    Calling it runs the user's module through ``torch.func.functional_call``
    with the unroll's parameters θ'_j and buffers, so the module object itself
    is never changed. ``named_parameters()``/``parameters()`` give θ'_j (for a
    penalty on the weights, say); ``module`` is the user's module.
    """

    def __init__(self, module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]):
        self.module = module
        self._params = params
        self._buffers = buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, (self._params, self._buffers), args, kwargs)

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._params.items())

    def parameters(self) -> Iterator[Tensor]:
        return iter(self._params.values())

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._buffers.items())
