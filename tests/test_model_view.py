"""The model that loss_fn sees behaves like the user's module, and the unroll trains what
torch.optim trains: frozen tensors (requires_grad=False) inside and outside the
optimizer, a module registered under two names, tied weights, parameters listed by the
optimizer in another order than the module's, submodules, eval mode, a parametrized layer
and a forward that raises.

Oracles: the real torch.optim training loop on a copy of the model (the user's own
loop), finite differences of that real training, the full autograd unroll, and the
user's module called directly."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from strategies import regression_batches
from test_sweep import assert_hypergradients_close

Batch = tuple[torch.Tensor, torch.Tensor]


def batches(seed: int, n_in: int, n_out: int, count: int) -> list[Batch]:
    return regression_batches(seed, n_in, n_out, count, size=8)


def real_training(model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
                  loss: Callable[[Any, Batch], torch.Tensor], train: list[Batch]) -> nn.Module:
    """The user's own loop with the real optimizer, on a copy of the model."""
    twin = copy.deepcopy(model)
    opt = make_opt(twin)
    for batch in train:
        opt.zero_grad()
        loss(twin, batch).backward()
        opt.step()
    return twin


def val_after(model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
              loss: Callable[[Any, Batch], torch.Tensor], train: list[Batch], val: Batch) -> float:
    trained = real_training(model, make_opt, loss, train)
    with torch.no_grad():
        return float(F.mse_loss(trained(val[0]), val[1]))


def mse(m: Any, batch: Batch, meta: Any = None) -> torch.Tensor:
    return F.mse_loss(m(batch[0]), batch[1])


def assert_models_equal(a: nn.Module, b: nn.Module, atol: float = 1e-13) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)



def assert_lr_and_commit_as_the_users_loop(solver: gimli.GimliSolver, model: nn.Module,
                                           make: Callable[[float], Callable[[nn.Module], torch.optim.Optimizer]],
                                           loss: Callable[[Any, Batch], torch.Tensor], train: list[Batch],
                                           val: Batch) -> None:
    """The hypergradient w.r.t. the lr (0.1) is the finite difference of the user's own
    loop, and a commit leaves the model as that loop does."""
    hg = float(solver.hypergradient(train, val)["hypers.lr"])
    h = 1e-6
    fd = (val_after(model, make(0.1 + h), loss, train, val) - val_after(model, make(0.1 - h), loss, train, val)) / (2 * h)
    assert abs(hg - fd) <= 1e-7 * abs(fd)
    expected = real_training(model, make(0.1), loss, train)
    solver.hypergradient(train, val, commit=True)
    assert_models_equal(model, expected)

# --- 5: a frozen parameter inside the optimizer does not step --------------------------------
@pytest.mark.parametrize("make", [
    lambda m, lr=0.1: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=0.01),
    lambda m, lr=0.1: torch.optim.Adam(m.parameters(), lr=lr, weight_decay=0.01),
    lambda m, lr=0.1: torch.optim.AdamW([{"params": m[2].parameters()},
                                         {"params": m[0].parameters(), "lr": 0.05}], lr=lr),
], ids=["SGD", "Adam", "AdamW-groups"])
def test_frozen_parameter_inside_the_optimizer_is_not_trained(make: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].requires_grad_(False)                      # a frozen first layer, still in the optimizer
    data = batches(1, 3, 1, 5)
    train, val = data[:4], data[4]
    opt = make(model)
    meta = gimli.MetaParams(opt, {"lr": "scalar"} if len(opt.param_groups) == 1 else {"lr": "group"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    hg = solver.hypergradient(train, val)
    if len(opt.param_groups) == 1:                      # d/d lr of the real training loop
        h = 1e-6
        fd = (val_after(model, lambda m: make(m, 0.1 + h), mse, train, val)
              - val_after(model, lambda m: make(m, 0.1 - h), mse, train, val)) / (2 * h)
        assert abs(float(hg["hypers.lr"]) - fd) <= 1e-7 * abs(fd)
    assert_hypergradients_close(hg, gimli.full_unroll_hypergradient(solver, train, val))
    expected = real_training(model, make, mse, train)
    solver.hypergradient(train, val, commit=True)       # the committed weights: the real loop's
    assert_models_equal(model, expected)
    assert all(not opt.state.get(p) for p in model[0].parameters())   # no state for frozen ones


def test_commit_with_a_frozen_parameter_equals_real_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].requires_grad_(False)

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    data = batches(2, 3, 1, 5)
    expected = real_training(model, make, mse, data[:4])
    opt = make(model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt,
                               gimli.MetaParams(opt, {"lr": "scalar"}))
    solver.hypergradient(data[:4], data[4], commit=True)
    assert_models_equal(model, expected)
    assert model[0].weight.requires_grad is False


# --- 6: a frozen backbone under init= ------------------------------------------------------------
@pytest.mark.parametrize("in_optimizer", [False, True])
def test_frozen_backbone_with_init(in_optimizer: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].requires_grad_(False)
    params = model.parameters() if in_optimizer else model[2].parameters()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.5)
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, init=model)
    data = batches(3, 3, 1, 4)
    meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-2)     # holds the frozen ones too: fine
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, meta_opt=meta_opt)
    hg = solver.hypergradient(data[:3], data[3])
    assert set(hg) == {"hypers.lr", "init.2.weight", "init.2.bias"}     # frozen: no hypergradient
    assert_hypergradients_close(hg, gimli.full_unroll_hypergradient(solver, data[:3], data[3]))
    before = model[0].weight.detach().clone()
    solver.step(data[:3], data[3])
    assert torch.equal(model[0].weight, before) and model[0].weight.grad is None


# --- 7: a module registered under two names, and tied weights -----------------------------------
def test_module_under_two_names_is_left_intact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(2, 2).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    weight = lin.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4, 2, 2, 4)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    hg = solver.hypergradient(data[:3], data[3])
    assert model[0].weight is weight and model[2].weight is weight      # not replaced
    assert isinstance(model[0].weight, nn.Parameter)
    h = 1e-6

    def make(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: torch.optim.SGD(m.parameters(), lr=lr)

    fd = (val_after(model, make(0.1 + h), mse, data[:3], data[3])
          - val_after(model, make(0.1 - h), mse, data[:3], data[3])) / (2 * h)
    assert abs(float(hg["hypers.lr"]) - fd) <= 1e-7 * abs(fd)


def test_module_under_two_names_with_init() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(2, 2).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = gimli.MetaParams(opt, ["lr"], init=model)
    data = batches(5, 2, 2, 4)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta,
                               meta_opt=torch.optim.SGD(meta.parameters(), lr=1e-2))
    hg = solver.hypergradient(data[:3], data[3])
    assert set(hg) == {"hypers.lr", "init.0.weight", "init.0.bias"}
    assert gimli.check(solver, data[:3], data[3]).passed
    solver.step(data[:3], data[3])
    assert model[0].weight is model[2].weight


def test_tied_weights_in_two_modules() -> None:
    """An encoder and a decoder sharing one weight (as language models tie embeddings)."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(3, 3, bias=False).double(), nn.Linear(3, 3).double()
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = batches(6, 3, 3, 4)
    meta = gimli.MetaParams(opt, ["lr"], init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    assert gimli.check(solver, data[:3], data[3]).passed
    expected = real_training(model, lambda m: torch.optim.Adam(m.parameters(), lr=0.05), mse, data[:3])
    plain = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    plain.hypergradient(data[:3], data[3], commit=True)
    assert_models_equal(model, expected)
    assert model[2].weight is model[0].weight


# --- 8: the optimizer's order is not the module's -----------------------------------------------
def test_named_parameters_in_the_module_order() -> None:
    """The guide's example (b)'s pattern (docs/guide/meta-learning.md): per-layer coefficients zipped with the weights of
    model.named_parameters(). The optimizer lists the layers in reverse: the committed
    weights must still be those of the user's own training loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    coefficients = torch.tensor([0.3, 0.01, 0.1], dtype=torch.float64)

    def loss(m: Any, batch: Batch) -> torch.Tensor:
        weights = [p for name, p in m.named_parameters() if name.endswith("weight")]
        return mse(m, batch) + sum(c * (w ** 2).sum() for c, w in zip(coefficients, weights))

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(m.parameters())[::-1], lr=0.05, momentum=0.9)

    data = batches(7, 3, 1, 5)
    expected = real_training(model, make, loss, data[:4])
    opt = make(model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: loss(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    solver.hypergradient(data[:4], data[4], commit=True)
    assert_models_equal(model, expected)


# --- the view behaves like the module ---------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(6, 2)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x))) * self.scale


def test_view_has_the_module_structure() -> None:
    torch.manual_seed(0)
    net = Net().double()
    params = {n: p.detach() * 1.5 for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    view = gimli.FunctionalModel(net, params, buffers)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert [n for n, _ in view.encoder.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert view.encoder[0].weight is params["encoder.0.weight"]     # θ'_j, not the user's tensor
    assert view.encoder[1].running_mean is buffers["encoder.1.running_mean"]
    assert next(view.head.parameters()) is params["head.weight"]
    assert view.scale == 2.0 and view.training
    assert list(view.state_dict()) == list(net.state_dict())
    # a submodule view computes with the view's parameters, like the module's own submodule
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(params[n])
    torch.testing.assert_close(view.eval().encoder(x), reference.eval().encoder(x))
    # eval mode: dropout off, BatchNorm on running statistics, the user's module unchanged
    net.train()
    net.encoder[1].eval()                   # the user's own per-submodule flags are kept
    out = view.eval()(x)
    torch.testing.assert_close(out, reference.eval()(x))
    assert net.training and not net.encoder[1].training and net.encoder[0].training
    assert view.eval().training is False and view.training is True


def test_named_parameters_and_buffers_as_the_modules_with_every_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    """The view's named_parameters and named_buffers give the module's names, for every
    prefix, recurse and remove_duplicate (a module under two names, a weight tied across
    two modules), each with the view's tensor; the module tree is walked once per
    module and arguments, not at every call (a loss that reads them every step)."""
    torch.manual_seed(0)
    net = Net().double()
    net.tail = nn.Linear(6, 2).double()
    net.tail.weight = net.head.weight                       # tied across two modules
    net.again = net.encoder                                 # one module under two names
    params = {n: p.detach() * 1.5 for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    view = gimli.FunctionalModel(net, params, buffers)
    root = {id(t): n for n, t in [*net.named_parameters(), *net.named_buffers()]}
    for module, sub in ((net, view), (net.encoder, view.encoder)):
        for prefix in ("", "m"):
            for recurse in (True, False):
                for dup in (True, False):
                    for kind, values in (("named_parameters", params), ("named_buffers", buffers)):
                        want = [(n, values[root[id(t)]]) for n, t in getattr(module, kind)(prefix, recurse, dup)]
                        for _ in range(2):
                            got = list(getattr(sub, kind)(prefix, recurse, dup))
                            assert [n for n, _ in got] == [n for n, _ in want]
                            assert all(a is b for (_, a), (_, b) in zip(got, want))
    walks = []
    monkeypatch.setattr(nn.Module, "named_modules", lambda *a, **k: walks.append(1) or iter(()))
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in params.items()]
    assert walks == []


def test_validation_loss_in_eval_mode() -> None:
    """L^val in eval mode through the view (dropout off); the unroll's training steps in
    training mode. (Without BatchNorm: L^val in eval mode would read running statistics
    that the unroll updates without gradients, as torch does, so finite differences of
    the whole run would see a dependence no autograd hypergradient has.)"""
    torch.manual_seed(0)
    net = Net().double()
    net.encoder[1] = nn.Identity()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    meta = gimli.MetaParams(opt, ["lr"], init=net)
    data = batches(8, 3, 2, 4)

    def val_loss(m: Any, batch: Batch, meta: Any) -> torch.Tensor:
        return mse(m.eval(), batch)

    solver = gimli.GimliSolver(net, lambda m, b, meta: mse(m, b), opt, meta, val_loss_fn=val_loss)
    assert gimli.check(solver, data[:3], data[3]).passed
    assert net.training


class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 2)
        self.dec = nn.Linear(2, 3)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.enc(x))

    @property
    def weight_norm(self) -> torch.Tensor:
        return self.enc.weight.norm() + self.dec.weight.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.encode(x))


def test_methods_and_properties_of_the_module_run_at_the_views_weights() -> None:
    """A loss written with the module's own methods (model.encode) and properties sees
    θ'_j, as the user's training loop sees its module's current weights."""
    torch.manual_seed(0)
    net = Autoencoder().double()
    params = {n: p.detach() * 0.5 for n, p in net.named_parameters()}
    view = gimli.FunctionalModel(net, params, {})
    x = torch.randn(4, 3, dtype=torch.float64)
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(view.encode(x), twin.encode(x))
    torch.testing.assert_close(view.weight_norm, twin.weight_norm)
    torch.testing.assert_close(view.forward(x), twin(x))
    assert all(p is q for p, q in zip(net.parameters(), dict(net.named_parameters()).values()))
    assert isinstance(net.enc.weight, nn.Parameter)

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def loss(m: Any, batch: torch.Tensor) -> torch.Tensor:
        code = m.encode(batch)
        return ((m.dec(code) - batch) ** 2).mean() + 1e-2 * m.weight_norm + 1e-2 * (code ** 2).mean()

    data = [torch.randn(6, 3, dtype=torch.float64) for _ in range(4)]
    expected = real_training(net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                             loss, data[:3])
    solver = gimli.GimliSolver(net, lambda m, b, meta: loss(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    assert gimli.check(solver, data[:3], data[3]).passed
    solver.hypergradient(data[:3], data[3], commit=True)
    assert_models_equal(net, expected)


def test_layers_selected_by_type_and_state_dict_as_in_the_users_loop() -> None:
    """Two common ways to write a penalty: an L2 over ``isinstance(m, nn.Linear)``
    layers of ``model.modules()`` (the view passes isinstance for the module's class),
    and a term built from ``model.state_dict()`` (detached, as nn.Module's is: a
    constant). Oracle: finite differences and commit of the user's own loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def loss(m: Any, batch: Batch) -> torch.Tensor:
        l2 = sum((layer.weight ** 2).sum() for layer in m.modules() if isinstance(layer, nn.Linear))
        drift = sum(((v - anchor[k]) ** 2).sum() for k, v in m.state_dict().items())
        return mse(m, batch) + 0.5 * l2 + 0.3 * drift      # drift: a constant, as in the loop

    def make(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5)

    data = batches(9, 3, 1, 4)
    opt = make(0.1)(model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: loss(m, b), opt, gimli.MetaParams(opt, ["lr"]),
                               val_loss_fn=mse)
    assert isinstance(gimli.FunctionalModel(model, dict(model.named_parameters()), {})[0], nn.Linear)
    assert_lr_and_commit_as_the_users_loop(solver, model, make, loss, data[:3], data[3])


class Fails(nn.Module):
    """A module whose forward raises after reading its weights (a shape error in user code)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.lin(x) @ torch.ones(3)      # (2,) @ (3,): raises


def test_a_call_that_raises_leaves_the_module_its_own_tensors() -> None:
    """The view puts θ'_j into the module for the call; when the forward raises, the
    module gets its own tensors back (the same objects, still nn.Parameter)."""
    net = Fails().double()
    own = {n: t for n, t in [*net.named_parameters(), *net.named_buffers()]}
    params = {n: p.detach() * 2 for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    view = gimli.FunctionalModel(net, params, buffers)
    with pytest.raises(RuntimeError):
        view(torch.randn(4, 3, dtype=torch.float64))
    assert all(t is own[n] for n, t in [*net.named_parameters(), *net.named_buffers()])
    assert isinstance(net.lin.weight, nn.Parameter) and float(net.count) == 0
    assert float(buffers["count"]) == 1                 # the view's buffer took the update


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(0, 1)


def test_a_parametrized_module_trains_as_in_the_users_loop() -> None:
    """A layer under ``torch.nn.utils.parametrize`` keeps its tensor in a
    ParametrizationList (``parametrizations.weight.original``), not under ``weight``: the
    view swaps that one, and the forward computes the weight from it at θ'_j. Oracles:
    the user's own loop (commit) and finite differences of it. (Not weight_norm:
    torch's ``_weight_norm`` has a wrong double backward on the CPU in torch 2.13, so no
    exact second-order method agrees with finite differences through it.)"""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    nn.utils.parametrize.register_parametrization(layer, "weight", Symmetric())
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1)).double()
    assert "0.parametrizations.weight.original" in dict(model.named_parameters())

    def make(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5)

    data = batches(10, 4, 1, 4)
    opt = make(0.1)(model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    assert_lr_and_commit_as_the_users_loop(solver, model, make, mse, data[:3], data[3])


def _weight_normed_model(legacy: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    if legacy:
        with pytest.warns(FutureWarning):                # (torch deprecates the hook for the parametrization)
            layer = nn.utils.weight_norm(layer)
    else:
        layer = nn.utils.parametrizations.weight_norm(layer)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_weight_norm_warns_where_its_second_derivative_is_wrong(legacy: bool) -> None:
    """torch 2.13's ``_weight_norm`` has a second derivative (on the CPU) that is not its
    gradient's derivative, so no hypergradient through a weight-normed layer is exact. The
    solver says so when it is built, where this torch's is wrong (measured on the model's
    device), and the warning is true: the hypergradient then misses the finite difference of
    the user's own loop."""
    from gimli._problem import weight_norm_hvp_error
    model = _weight_normed_model(legacy)

    def make(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5)

    opt = make(0.1)(model)
    wrong = weight_norm_hvp_error("cpu") > 1e-6
    if wrong:
        with pytest.warns(gimli.GimliWarning, match="weight norm"):
            solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    else:
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(opt, ["lr"]))
    data = batches(10, 3, 1, 4)
    hg = float(solver.hypergradient(data[:3], data[3])["hypers.lr"])
    if legacy:                                          # (torch cannot deepcopy that module: no loop twin)
        return
    h = 1e-6
    fd = (val_after(model, make(0.1 + h), mse, data[:3], data[3])
          - val_after(model, make(0.1 - h), mse, data[:3], data[3])) / (2 * h)
    assert (abs(hg - fd) > 1e-5 * abs(fd)) == wrong


def test_the_weight_norm_self_check_tells_a_right_second_derivative(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check behind that warning: torch's own ``_weight_norm`` against the same norm
    written out (g·v/‖v‖ over dimension 0), whose second derivative autograd gets right."""
    from gimli._problem import weight_norm_hvp_error
    weight_norm_hvp_error.cache_clear()
    torch_error = weight_norm_hvp_error("cpu")
    monkeypatch.setattr(torch, "_weight_norm",
                        lambda v, g, dim: g * v / v.norm(dim=tuple(range(1, v.dim())), keepdim=True))
    weight_norm_hvp_error.cache_clear()
    try:
        assert weight_norm_hvp_error("cpu") < 1e-8
    finally:
        weight_norm_hvp_error.cache_clear()
    assert torch_error > 1e-6 or torch_error < 1e-8     # (right or wrong, never in between)
