"""``GimliSolver(compile=True)``: the rule's step and VJP run through ``torch.compile``
and give the eager hypergradient. Oracle: the same solver without compile, and the full
autograd unroll (which steps eagerly: nothing is differentiated through compiled code).

Few tests: each rule's first compile in a process takes seconds on a CPU."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from gimli.optim._settings import TYPICAL
from strategies import regression_batches


def solver_for(model: nn.Module, compile: bool) -> gimli.GimliSolver:
    model = copy.deepcopy(model)
    opt = torch.optim.Adam([{"params": model[0].parameters()},
                            {"params": model[2].parameters(), "lr": 0.02}], lr=0.01, weight_decay=0.01)
    meta = gimli.MetaParams(opt, {"lr": "tensor", "beta1": "scalar"})

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y)

    return gimli.GimliSolver(model, loss_fn, opt, meta, compile=compile)


def _mlp_and_data(seed: int, J: int) -> tuple[nn.Module, list[Any], Any]:
    """A float64 3-8-1 tanh MLP and J training batches with a validation batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    batches = regression_batches(seed, 3, 1, J + 1)
    return model, batches[:J], batches[J]


def _agree(eager: dict[str, torch.Tensor], compiled: dict[str, torch.Tensor],
           oracle: dict[str, torch.Tensor]) -> None:
    """compiled within 1e-9 of eager, and of the autograd unroll, relative to eager's size."""
    assert eager.keys() == compiled.keys() == oracle.keys()
    for key in eager:
        scale = eager[key].abs().max()
        assert scale > 0, key
        assert (compiled[key] - eager[key]).abs().max() <= 1e-9 * scale, key
        assert (oracle[key] - compiled[key]).abs().max() <= 1e-9 * scale, key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch's own, importing inductor
def test_compiled_hypergradient_equals_eager() -> None:
    model, train, val = _mlp_and_data(0, 4)
    eager = solver_for(model, False).hypergradient(train, val)
    compiled_solver = solver_for(model, True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = compiled_solver.hypergradient(train, val)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2   # step and VJP ran compiled
    _agree(eager, compiled, gimli.full_unroll_hypergradient(compiled_solver, train, val))


# The flat path's pieces each of these exercises under the compiler: a state buffer the
# first step creates (SGD's momentum), one number per tensor carried in the state and its
# cotangent placed back (NAdam's mu_product), a state entry the step creates per tensor
# (ASGD's eta).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["SGD", "NAdam", "ASGD"])
def test_compiled_rule_equals_eager_and_the_unroll(name: str) -> None:
    model, train, val = _mlp_and_data(1, 4)

    def make(compile: bool) -> gimli.GimliSolver:
        m = copy.deepcopy(model)
        opt = getattr(torch.optim, name)([{"params": m[0].parameters()}, {"params": m[2].parameters()}],
                                         **TYPICAL[name])
        meta = gimli.MetaParams(opt, {"lr": "tensor"})

        def loss_fn(model: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(model(x), y)

        return gimli.GimliSolver(m, loss_fn, opt, meta, compile=compile)

    eager = make(False).hypergradient(train, val)
    compiled_solver = make(True)
    compiled = compiled_solver.hypergradient(train, val)
    _agree(eager, compiled, gimli.full_unroll_hypergradient(compiled_solver, train, val))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("learned", [("lr",), ("lr", "beta1", "beta2")])
def test_a_compiled_adam_call_is_handed_its_bias_corrections(learned: tuple[str, ...],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled Adam call gets 1 − β₁^t and 1 − β₂^t formed before it (``Rule.scalars``),
    once for each step and once for each VJP, each equal to what the rule forms itself;
    and the hypergradient (of the lrs, and of β₁ and β₂ where those are learned, so that
    the corrections are tensors with cotangents) is the eager one and the unroll's."""
    from gimli.optim import SUPPORTED, adam
    formed: list[tuple[int, float, float]] = []

    def scalars(s: Any, hp: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = adam.scalars(s, hp)
        t = s.step + 1
        assert torch.equal(out["c1"], 1 - hp["beta1"] ** t) and torch.equal(out["c2"], 1 - hp["beta2"] ** t)
        formed.append((t, float(out["c1"].reshape(-1)[0]), float(out["c2"].reshape(-1)[0])))
        return out

    monkeypatch.setitem(SUPPORTED, torch.optim.Adam, dataclasses.replace(adam.RULE, scalars=scalars))
    model, train, val = _mlp_and_data(2, 5)

    def make(compile: bool) -> gimli.GimliSolver:
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.8, 0.95))
        meta = gimli.MetaParams(opt, {name: "tensor" if name == "lr" else "scalar" for name in learned})
        return gimli.GimliSolver(m, lambda mm, b, meta: F.mse_loss(mm(b[0]), b[1]), opt, meta, compile=compile)

    eager = make(False).hypergradient(train, val)
    assert formed == []                                     # eager: the rule forms them itself
    compiled_solver = make(True)
    compiled = compiled_solver.hypergradient(train, val)
    assert sorted(t for t, _, _ in formed) == sorted(list(range(1, 6)) * 2)     # 5 steps, 5 VJPs
    assert all(abs(c1 - (1 - 0.8 ** t)) < 1e-12 and abs(c2 - (1 - 0.95 ** t)) < 1e-12 for t, c1, c2 in formed)
    assert eager.keys() == {f"hypers.{n}" for n in learned}
    _agree(eager, compiled, gimli.full_unroll_hypergradient(compiled_solver, train, val))
