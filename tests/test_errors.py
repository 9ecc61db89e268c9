"""Mistakes a newcomer makes get messages that say what is wrong and what to do.

Oracle: the message itself (each names the argument and the expected form)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from strategies import regression_batches


def setup() -> tuple[nn.Module, Any, torch.optim.Optimizer, gimli.MetaParams, list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    data = regression_batches(1, 3, 1, 4, size=8)

    def loss_fn(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    return model, loss_fn, opt, meta, data


@pytest.mark.parametrize("order", [(0, 2, 1, 3), (0, 1, 3, 2), (1, 0, 2, 3), (0, 3, 2, 1)])
def test_swapped_positional_arguments(order: tuple[int, ...]) -> None:
    model, loss_fn, opt, meta, _ = setup()
    args = [(model, loss_fn, opt, meta)[i] for i in order]
    with pytest.raises(TypeError, match=r"GimliSolver\(model, loss_fn, opt, meta_params.*argument \d"):
        gimli.GimliSolver(*args)


def test_loss_functions_with_the_wrong_arguments() -> None:
    model, loss_fn, opt, meta, data = setup()
    with pytest.raises(TypeError, match=r"loss_fn\(model, batch, meta\)"):
        gimli.GimliSolver(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), opt, meta)
    with pytest.raises(TypeError, match=r"val_loss_fn\(model, batch, meta\), as loss_fn is"):
        gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=lambda m: 0.0)
    # the old two-argument L^val still works, with a DeprecationWarning that names the new form
    with pytest.warns(DeprecationWarning, match=r"val_loss_fn\(model, batch, meta\)"):
        old = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]))
    new = gimli.GimliSolver(model, loss_fn, opt, meta,
                            val_loss_fn=lambda m, b, meta: F.mse_loss(m(b[0]), b[1]))
    torch.testing.assert_close(old.hypergradient(data[:3], data[3])["hypers.lr"],
                               new.hypergradient(data[:3], data[3])["hypers.lr"], rtol=0, atol=0)
    # the three-argument training loss reused as L^val works (it may read meta)
    solver = gimli.GimliSolver(model, loss_fn, opt, meta, val_loss_fn=loss_fn)
    torch.testing.assert_close(solver.hypergradient(data[:3], data[3])["hypers.lr"],
                               gimli.GimliSolver(model, loss_fn, opt, meta).hypergradient(
                                   data[:3], data[3])["hypers.lr"], rtol=0, atol=0)


def test_one_batch_where_a_list_of_batches_is_expected() -> None:
    model, loss_fn, opt, meta, data = setup()
    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    with pytest.raises(TypeError, match=r"looks like one batch.*\[\(x, y\)\]"):
        solver.hypergradient(data[0], data[3])
    with pytest.raises(TypeError, match="not a tensor"):
        solver.hypergradient(data[0][0], data[3])


def test_an_error_inside_loss_fn_says_where() -> None:
    model, _, opt, meta, data = setup()

    def loss_fn(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        return F.mse_loss(m(batch), batch)          # forgot to unpack (x, y)

    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    with pytest.raises(TypeError) as error:
        solver.hypergradient(data[:3], data[3])
    notes = "\n".join(getattr(error.value, "__notes__", []))
    assert "inner step 0" in notes and "a tuple of 2 (a tensor of shape (8, 3)" in notes


def test_metaparams_with_one_name() -> None:
    _, _, opt, _, _ = setup()
    meta = gimli.MetaParams(opt, "lr")
    assert [n for n, _ in meta.named_parameters()] == ["hypers.lr"]


def test_metaparams_for_another_optimizer() -> None:
    model, loss_fn, opt, _, _ = setup()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"different optimizer \(SGD\).*opt \(Adam"):
        gimli.GimliSolver(model, loss_fn, opt, gimli.MetaParams(other, ["lr"]))


def test_tasks_that_are_not_pairs() -> None:
    model, loss_fn, opt, meta, data = setup()
    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    with pytest.raises(TypeError, match=r"tasks= is a list of \(train_batches, val_batch\) pairs.*tasks\[0\] is a list of 3"):
        solver.hypergradient(tasks=[data[:3], data[3]])


def test_an_error_in_the_validation_loss_says_where() -> None:
    model, loss_fn, opt, meta, data = setup()
    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    with pytest.raises(Exception) as error:
        solver.hypergradient(data[:3], [data[3], data[3]])         # a list where one batch goes
    notes = "\n".join(getattr(error.value, "__notes__", []))
    assert "validation loss on val_batch, a list of 2" in notes and "one batch" in notes


def test_a_loss_that_calls_the_users_module_itself() -> None:
    model, _, opt, meta, data = setup()

    def loss_fn(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])        # the module, not the view m

    solver = gimli.GimliSolver(model, loss_fn, opt, meta)
    with pytest.raises(ValueError, match="the model it is given"):
        solver.hypergradient(data[:3], data[3])
