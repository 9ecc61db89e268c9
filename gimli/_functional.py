"""The user's model seen as a function of its parameters (never modified)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn


class Slots:
    """Where a module keeps its tensors: every (submodule, attribute) once.

    A module registered under two names (``nn.Sequential(lin, act, lin)``) holds its
    tensors in one place, so it is swapped once (swapping it under both names would
    put the view's tensor back as the module's own); two modules sharing one tensor
    (tied weights) are two places, both given that tensor's value.
    """

    def __init__(self, root: nn.Module):
        self.canonical: dict[int, str] = {}         # id(tensor) → its name in the root
        for name, p in root.named_parameters():
            self.canonical[id(p)] = name
        for name, b in root.named_buffers():
            self.canonical.setdefault(id(b), name)
        self._places: dict[int, list[tuple[dict[str, Any], str, str]]] = {}
        self._named: dict[tuple[Any, ...], list[tuple[str, str]]] = {}

    def places(self, module: nn.Module) -> list[tuple[dict[str, Any], str, str]]:
        """Each place in ``module``: the table that holds it (a submodule's
        ``_parameters`` or ``_buffers``), its key there, and the tensor's name in the root."""
        key = id(module)
        if key not in self._places:             # (modules(): a module under two names once)
            self._places[key] = [(table, attr, self.canonical[id(t)]) for sub in module.modules()
                                 for table in (sub._parameters, sub._buffers)
                                 for attr, t in table.items() if t is not None and id(t) in self.canonical]
        return self._places[key]

    def named(self, module: nn.Module, buffers: bool, prefix: str, recurse: bool,
              remove_duplicate: bool) -> list[tuple[str, str]]:
        """Each (name, name in the root) that ``module.named_parameters`` (``named_buffers``
        if ``buffers``) gives with these arguments, walked once: a loss that reads
        ``model.named_parameters()`` every step (a weight penalty) does not walk the
        module tree every step."""
        key = (id(module), buffers, prefix, recurse, remove_duplicate)
        found = self._named.get(key)
        if found is None:
            named = (module.named_buffers if buffers else module.named_parameters)(prefix, recurse, remove_duplicate)
            found = self._named[key] = [(name, self.canonical[id(t)]) for name, t in named
                                        if id(t) in self.canonical]
        return found


class FunctionalModel:
    """What ``loss_fn`` and ``val_loss_fn`` receive as ``model``.

    It behaves like the user's module at the unroll's parameters θ'_j and buffers (it
    passes ``isinstance`` for the module's class, so ``for m in model.modules(): if
    isinstance(m, nn.Linear): ...`` selects the same layers):
    calling it runs the module's own ``forward`` with θ'_j in the module's places for
    the length of the call, as ``torch.func.functional_call`` does, and the module's own
    tensors back in them after it, also when the call raises. ``named_parameters()`` and
    ``parameters()`` give θ'_j in the module's own order (the optimizer's order does
    not matter), ``named_buffers()`` the buffers, and so does an attribute
    (``model.head.weight``); a submodule (``model.encoder``, ``model[0]``) is a view
    of the same kind; a method or property of the module's own class
    (``model.encode(x)``) runs with the view's tensors too; other attributes are the
    module's.

    ``model.eval()`` and ``model.train()`` return a view that runs the module in that
    mode (dropout off, BatchNorm on its running statistics) without changing the
    user's module: ``val_loss_fn = lambda model, batch, meta: loss(model.eval()(batch[0]), ...)``
    evaluates L^val in eval mode.
    """

    def __init__(self, module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                 *, slots: Slots | None = None, mode: bool | None = None):
        self.module = module
        self._params = params           # by the name of each tensor in the root module
        self._buffers = buffers
        self._slots = slots if slots is not None else Slots(module)
        self._mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.module, *args, **kwargs)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the module holding the view's tensors, each put in
        its place for the call and the module's own put back after it, as
        ``torch.func.functional_call`` does (whose generality, a name lookup and checks
        per tensor, costs about 20 µs a call: a forward of a small MLP)."""
        if self._mode is not None:
            with self._in_mode():
                return self._held(fn, args, kwargs)
        return self._held(fn, args, kwargs)

    def _held(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        saved: list[tuple[dict[str, Any], str, Any]] = []
        params, buffers = self._params, self._buffers
        try:
            for table, attr, root in self._slots.places(self.module):
                value = params.get(root)
                if value is None:
                    value = buffers.get(root)
                    if value is None:
                        continue
                saved.append((table, attr, table[attr]))
                table[attr] = value
            return fn(*args, **kwargs)
        finally:
            for table, attr, own in reversed(saved):
                table[attr] = own

    @contextlib.contextmanager
    def _in_mode(self) -> Iterator[None]:
        """The module in the view's mode (train or eval) for the call, its own flags after it."""
        assert self._mode is not None
        flags = [(m, m.training) for m in self.module.modules()]
        self.module.train(self._mode)
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag

    # --- like an nn.Module --------------------------------------------------------------------
    @property                                   # type: ignore[misc]
    def __class__(self) -> type:                # isinstance(view, nn.Linear) as for the module
        return type(self.module)

    @property
    def training(self) -> bool:
        return self.module.training if self._mode is None else self._mode

    def train(self, mode: bool = True) -> FunctionalModel:
        """A view that runs the module in training mode (``mode=False``: eval mode)."""
        return FunctionalModel(self.module, self._params, self._buffers, slots=self._slots, mode=mode)

    def eval(self) -> FunctionalModel:
        """A view that runs the module in eval mode; the user's module is not changed."""
        return self.train(False)

    @staticmethod
    def _values(named: list[tuple[str, str]], values: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        """The module's own (name, tensor) pairs, each tensor replaced by the view's value."""
        for name, root in named:
            if root in values:
                yield name, values[root]

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._values(self._slots.named(self.module, False, prefix, recurse, remove_duplicate),
                            self._params)

    def parameters(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, t in self.named_parameters(recurse=recurse):
            yield t

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._values(self._slots.named(self.module, True, prefix, recurse, remove_duplicate),
                            self._buffers)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, t in self.named_buffers(recurse=recurse):
            yield t

    def state_dict(self, *, keep_vars: bool = False) -> dict[str, Tensor]:
        """Parameters and buffers by name, as the module's ``state_dict`` orders them;
        detached unless ``keep_vars`` (as ``nn.Module.state_dict``: a loss term built
        from it is a constant in the user's own training too)."""
        values = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return {k: values[k] if keep_vars else values[k].detach()
                for k in self.module.state_dict(keep_vars=True) if k in values}

    def _sub(self, module: nn.Module) -> FunctionalModel:
        return FunctionalModel(module, self._params, self._buffers, slots=self._slots, mode=self._mode)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "module":
            raise AttributeError(name)
        value = getattr(self.module, name)
        if isinstance(value, nn.Module) and name in self.module._modules:
            return self._sub(value)
        if isinstance(value, Tensor) and (name in self.module._parameters or name in self.module._buffers):
            root = self._slots.canonical.get(id(value))
            for values in (self._params, self._buffers):
                if root in values:
                    return values[root]         # θ'_j's entry, not the user's tensor
        if isinstance(inspect.getattr_static(type(self.module), name, None), property):
            return self._run(lambda: getattr(self.module, name))       # computed at θ'_j
        if inspect.ismethod(value) and value.__self__ is self.module and \
                getattr(type(self.module), name, None) is not getattr(nn.Module, name, None):
            return functools.partial(self._run, value)                 # model.encode(x) at θ'_j
        return value

    def __getitem__(self, index: Any) -> Any:
        item = self.module[index]                           # type: ignore[index]
        if isinstance(item, nn.Module) and isinstance(index, (int, str)):
            return self._sub(item)
        raise TypeError(f"indexing the functional view of {type(self.module).__name__} with "
                        f"{index!r}: only single submodules (model[0], model['name'])")

    def __len__(self) -> int:
        return len(self.module)                             # type: ignore[arg-type]

    def __iter__(self) -> Iterator[FunctionalModel]:
        for name, sub in self.module._modules.items():
            if sub is not None:
                yield self._sub(sub)

    def children(self) -> Iterator[FunctionalModel]:
        return iter(self)

    def named_children(self) -> Iterator[tuple[str, FunctionalModel]]:
        for name, sub in self.module._modules.items():
            if sub is not None:
                yield name, self._sub(sub)

    def modules(self) -> Iterator[FunctionalModel]:
        for _, view in self.named_modules():
            yield view

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, FunctionalModel]]:
        for name, sub in self.module.named_modules(prefix=prefix):
            yield name, self._sub(sub)

    def __repr__(self) -> str:
        return f"FunctionalModel({self.module!r})"
