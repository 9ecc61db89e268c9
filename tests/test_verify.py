"""gimli.check, the user-facing checker: it passes on a correct setup, fails on a
deliberately corrupted hypergradient (against both of its references), and changes
nothing of the user's. Its references are the full autograd unroll and central
finite differences of the unroll's validation loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from gimli.optim import adam
from test_solver import assert_same, snapshot


def setup(dropout: float = 0.2) -> tuple[gimli.GimliSolver, list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 1))
    opt = torch.optim.Adam([{"params": model[0].parameters()},
                            {"params": model[3].parameters(), "lr": 0.02}], lr=0.01, weight_decay=0.01)
    meta = gimli.MetaParams(opt, {"lr": "group", "beta2": "scalar"},
                            loss={"l2": torch.tensor(0.01)}, init=model)

    def loss_fn(m: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y) + meta["l2"] * sum((p ** 2).sum() for p in m.parameters())

    solver = gimli.GimliSolver(model, loss_fn, opt, meta, meta_opt=torch.optim.Adam(meta.parameters()))
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    solver.step(batches[:3], batches[3])            # optimizer and meta-optimizer hold state
    opt.step()
    return solver, batches


def test_check_passes_and_changes_nothing() -> None:
    solver, batches = setup()
    before = snapshot(solver.problem.module, solver.problem.inner.torch_optimizer,
                      solver.meta, solver.meta_opt)
    rng = torch.get_rng_state()
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed, str(report)
    assert [p.name for p in report.params] == [n for n, _ in solver.meta.named_parameters()]
    assert all(p.autograd_error <= 1e-12 and p.fd_error <= 1e-7 and p.elements > 0 for p in report.params)
    assert all(not p.zero for p in report.params)
    assert_same(before, snapshot(solver.problem.module, solver.problem.inner.torch_optimizer,
                                 solver.meta, solver.meta_opt))
    assert torch.equal(torch.get_rng_state(), rng)
    assert next(solver.problem.module.parameters()).dtype == torch.float32   # the copy was float64
    assert "PASS" in str(report) and "init.0.weight" in str(report)


@pytest.mark.parametrize("scale", [1.0 + 1e-4, 0.0])
def test_check_catches_a_corrupted_hypergradient(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """The lr cotangent of Adam's VJP scaled by 1 + 1e-4 (or dropped): both references object."""
    solver, batches = setup()
    original = adam.vjp

    def corrupted(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if "lr" in out.hypers:
            out.hypers["lr"] = [scale * a for a in out.hypers["lr"]]
        return out

    monkeypatch.setattr(adam, "vjp", corrupted)
    report = gimli.check(solver, batches[:3], batches[3])
    verdicts = {p.name: p for p in report.params}
    assert not report.passed and not verdicts["hypers.lr"].passed
    assert verdicts["hypers.lr"].autograd_error > 5e-5 and verdicts["hypers.lr"].fd_error > 5e-5
    assert all(p.passed for n, p in verdicts.items() if n != "hypers.lr")
    with pytest.raises(AssertionError, match="hypers.lr .* FAIL"):
        gimli.assert_hypergradients_correct(solver, batches[:3], batches[3])


def test_finite_differences_skipped_where_the_hypergradient_is_not_the_derivative() -> None:
    solver, batches = setup(dropout=0.0)
    solver.first_order = True
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed and all(p.elements == 0 for p in report.params)
