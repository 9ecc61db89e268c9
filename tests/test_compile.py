"""``GimliSolver(compile=True)``: the rule's step and VJP run through ``torch.compile``
and give the eager hypergradient. Oracle: the same solver without compile, and the full
autograd unroll (which steps eagerly: nothing is differentiated through compiled code).

One test: the first compile in a process takes tens of seconds on a CPU."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
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
