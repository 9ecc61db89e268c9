"""``GimliSolver(compile=True)``: the rule's step and VJP run through ``torch.compile``
and give the eager hypergradient. Oracle: the same solver without compile, and the full
autograd unroll (which steps eagerly: nothing is differentiated through compiled code).

Few tests: each rule's first compile in a process takes seconds on a CPU."""

from __future__ import annotations

import copy
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch's own, importing inductor
def test_compiled_hypergradient_equals_eager() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    batches = regression_batches(0, 3, 1, 5)
    train, val = batches[:4], batches[4]
    eager = solver_for(model, False).hypergradient(train, val)
    compiled_solver = solver_for(model, True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = compiled_solver.hypergradient(train, val)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2   # step and VJP ran compiled
    oracle = gimli.full_unroll_hypergradient(compiled_solver, train, val)
    assert eager.keys() == compiled.keys() == oracle.keys()
    for name in eager:
        scale = eager[name].abs().max()
        assert scale > 0, name
        assert (compiled[name] - eager[name]).abs().max() <= 1e-9 * scale, name
        assert (oracle[name] - eager[name]).abs().max() <= 1e-9 * scale, name


# The flat path's pieces each of these exercises under the compiler: a state buffer the
# first step creates (SGD's momentum), one number per tensor carried in the state and its
# cotangent placed back (NAdam's mu_product), a state entry the step creates per tensor
# (ASGD's eta).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["SGD", "NAdam", "ASGD"])
def test_compiled_rule_equals_eager_and_the_unroll(name: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    batches = regression_batches(1, 3, 1, 5)
    train, val = batches[:4], batches[4]

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
    oracle = gimli.full_unroll_hypergradient(compiled_solver, train, val)
    for key in eager:
        scale = eager[key].abs().max()
        assert scale > 0, key
        assert (compiled[key] - eager[key]).abs().max() <= 1e-9 * scale, key
        assert (oracle[key] - compiled[key]).abs().max() <= 1e-9 * scale, key
