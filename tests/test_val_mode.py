"""``GimliSolver(val_mode="eval")``: L^val with dropout off and BatchNorm on its running
statistics, without the user toggling the module.

Oracles: the same solver with a ``val_loss_fn`` that asks for the eval-mode view itself
(``model.eval()``), and the full autograd unroll (``gimli.full_unroll_hypergradient``) of
the solver; the user's module keeps its own mode.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from strategies import regression_batches
from test_sweep import assert_hypergradients_close


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.4),
                         nn.Linear(8, 2)).double()


def solver(model: nn.Module, val_mode: str | None, val_loss_fn: Any = None,
           mode: str = "reverse") -> gimli.GimliSolver:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meta = gimli.MetaParams(opt, {"lr": "scalar", "momentum": "scalar"})
    return gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta,
                             val_loss_fn=val_loss_fn, val_mode=val_mode, mode=mode)


def test_eval_mode_validation() -> None:
    batches = regression_batches(3, 3, 2, 6, size=10)
    train, val = batches[:5], batches[5]
    model = net()

    def by_hand(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        return F.mse_loss(m.eval()(batch[0]), batch[1])

    results = {}
    for key, args in {"val_mode": ("eval", None), "by hand": (None, by_hand),
                      "own mode": (None, None), "forward": ("eval", None, "forward")}.items():
        s = solver(copy.deepcopy(model), *args)
        torch.manual_seed(1)
        results[key] = s.hypergradient(train, val)
        if key == "val_mode":
            torch.manual_seed(1)
            oracle = gimli.full_unroll_hypergradient(s, train, val)
    assert_hypergradients_close(results["val_mode"], results["by hand"])
    assert_hypergradients_close(results["val_mode"], oracle)
    assert_hypergradients_close(results["forward"], results["val_mode"])
    # the module's own mode (train: dropout and batch statistics) is another L^val
    assert (results["own mode"]["hypers.lr"] - results["val_mode"]["hypers.lr"]).abs() > 1e-6
    assert model.training and all(m.training for m in model.modules())     # untouched


def test_train_mode_validation_of_a_module_in_eval_mode() -> None:
    """val_mode="train" on a module the user left in eval mode: L^val with batch
    statistics, as the module in train mode computes it (the unroll's steps run in the
    module's own mode, here eval, in both)."""
    batches = regression_batches(4, 3, 2, 6, size=10)
    model = net().eval()
    s = solver(model, "train")
    torch.manual_seed(1)                # the same dropout masks in L^val for both
    got = s.hypergradient(batches[:5], batches[5])
    by_hand = solver(copy.deepcopy(model), None, lambda m, b, meta: F.mse_loss(m.train()(b[0]), b[1]))
    torch.manual_seed(1)
    assert_hypergradients_close(got, by_hand.hypergradient(batches[:5], batches[5]))
    assert not model.training
    with pytest.raises(ValueError, match="val_mode must be 'eval', 'train' or None"):
        solver(model, "test")
