"""gimli.check, the user-facing checker: it passes on a correct setup, fails on a
deliberately corrupted hypergradient (against both of its references), and changes
nothing of the user's. Its references are the full autograd unroll and central
finite differences of the unroll's validation loss.

It never calls a correct result wrong: where the autograd reference is NaN (√0 at a
dead unit), where the hypergradient is zero up to rounding (a bias feeding BatchNorm),
where L^val has a kink within the finite-difference step (placed by hand) or a
hyperparameter sits on an end of its range, under first_order/truncate, through Muon's
bfloat16 step, in float32, and under torch.distributed (two gloo processes) — while
corrupted hypergradients in each of these settings still fail."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gimli
from test_distributed import _finish
from gimli.optim import adagrad, adam, rmsprop
import setups
from strategies import mlp, mse, regression_batches
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
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_default_dtype() == torch.float32
    assert next(solver.problem.module.parameters()).dtype == torch.float32   # the copy was float64
    assert "PASS" in str(report) and "init.0.weight" in str(report)


def corrupt_lr(monkeypatch: pytest.MonkeyPatch, rule: Any, scale: float) -> None:
    """Scale the lr cotangent of an optimizer file's VJP (a wrong hypergradient)."""
    setups.corrupt_lr(monkeypatch, rule, scale)


@pytest.mark.parametrize("scale", [1.0 + 1e-4, 0.0])
def test_check_catches_a_corrupted_hypergradient(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """The lr cotangent of Adam's VJP scaled by 1 + 1e-4 (or dropped): both references object."""
    solver, batches = setup()
    corrupt_lr(monkeypatch, adam, scale)
    report = gimli.check(solver, batches[:3], batches[3])
    verdicts = {p.name: p for p in report.params}
    assert not report.passed and not verdicts["hypers.lr"].passed
    assert verdicts["hypers.lr"].autograd_error > 5e-5 and verdicts["hypers.lr"].fd_error > 5e-5
    assert all(p.passed for n, p in verdicts.items() if n != "hypers.lr")
    with pytest.raises(AssertionError, match="hypers.lr .* FAIL"):
        gimli.assert_hypergradients_correct(solver, batches[:3], batches[3])


@pytest.mark.parametrize("mode", [dict(first_order=True), dict(truncate=2)], ids=["first_order", "truncate"])
def test_first_order_and_truncate_against_the_stopped_function(monkeypatch: pytest.MonkeyPatch,
                                                               mode: dict[str, Any]) -> None:
    """Finite differences of the function the hypergradient is the derivative of: G_j on
    the unperturbed trajectory, or the first J − K steps held; a corrupted lr fails."""
    solver, batches = setup()
    for key, value in mode.items():
        setattr(solver, key, value)
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed, str(report)
    assert all(p.elements > 0 and p.fd_error <= 1e-6 for p in report.params)
    if "truncate" in mode:          # θ₀ cannot reach L^val through a truncated sweep: exactly 0
        assert all(p.zero for p in report.params if p.name.startswith("init."))
    corrupt_lr(monkeypatch, adam, 1.0 + 1e-4)
    verdicts = {p.name: p for p in gimli.check(solver, batches[:3], batches[3]).params}
    assert not verdicts["hypers.lr"].passed and verdicts["hypers.lr"].fd_error > 5e-5


# --- (a) the autograd reference is NaN at √0 (dead ReLU units under Adam-like optimizers) ----
DEAD = {"Adam": (torch.optim.Adam, dict(betas=(0.8, 0.95), eps=1e-3), ["lr", "beta1", "beta2", "eps"], adam),
        "RMSprop": (torch.optim.RMSprop, dict(alpha=0.9, eps=1e-3, momentum=0.5, centered=True),
                    ["lr", "alpha", "eps", "momentum"], rmsprop),
        "Adagrad": (torch.optim.Adagrad, dict(eps=1e-3), ["lr", "lr_decay", "eps"], adagrad)}


def dead_units(kind: str) -> tuple[gimli.GimliSolver, list[Any]]:
    """A ReLU unit that never fires: its weights get G = 0 at every step, v = 0 under √."""
    cls, kwargs, names, _ = DEAD[kind]
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "relu")
    with torch.no_grad():
        model[0].bias[0] = -100.0
    opt = cls(model.parameters(), lr=0.02, **kwargs)
    meta = gimli.MetaParams(opt, names, init=model)
    return gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta), regression_batches(3, 2, 1, 4)


@pytest.mark.parametrize("kind", sorted(DEAD))
def test_dead_units_judged_by_finite_differences(kind: str) -> None:
    """Every meta-parameter whose autograd reference is NaN is judged by finite
    differences alone, on elements that are checked, and passes."""
    solver, batches = dead_units(kind)
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed, str(report)
    nan_rows = [p for p in report.params if p.nonfinite]
    assert {"hypers.lr", "init.0.weight"} <= {p.name for p in nan_rows}      # the motivation
    assert all(p.elements > 0 and p.fd_error <= 1e-6 and p.status == "pass" for p in nan_rows)
    assert "autograd NaN" in str(report)


@pytest.mark.parametrize("scale", [1.0 + 1e-4, 0.0, float("nan")])
@pytest.mark.parametrize("kind", ["Adam", "RMSprop"])
def test_dead_units_a_corrupted_or_nonfinite_hypergradient_fails(monkeypatch: pytest.MonkeyPatch,
                                                                 kind: str, scale: float) -> None:
    """With the autograd reference NaN, finite differences alone still catch an lr
    hypergradient off by 1e-4 or dropped; a NaN from gimli always fails."""
    solver, batches = dead_units(kind)
    corrupt_lr(monkeypatch, DEAD[kind][3], scale)
    verdicts = {p.name: p for p in gimli.check(solver, batches[:3], batches[3]).params}
    lr = verdicts.pop("hypers.lr")
    assert lr.nonfinite and lr.status == "FAIL"
    assert scale != scale or lr.fd_error > 5e-5
    assert all(p.passed for p in verdicts.values()), verdicts


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_weight_decay_at_zero_differenced_into_its_range(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """A weight decay of 0 is on the end of its valid range: outside, the range's clamp
    makes L^val flat, so only the one-sided derivative into the range is gimli's. With
    dead units (autograd NaN) it alone judges it: it passes, and a zeroed hypergradient
    (the flat side's value) fails."""
    torch.manual_seed(0)
    model = mlp([2, 4, 1], "relu")
    with torch.no_grad():
        model[0].bias[0] = -100.0
    opt = cls(model.parameters(), lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0)
    meta = gimli.MetaParams(opt, ["lr", "weight_decay"])
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    batches = regression_batches(3, 2, 1, 4)
    rows = {p.name: p for p in gimli.check(solver, batches[:3], batches[3]).params}
    wd = rows["hypers.weight_decay"]
    assert wd.nonfinite and wd.status == "pass" and wd.one_sided == wd.elements == 1 and not wd.zero
    original = gimli.GimliSolver.hypergradient

    def corrupted(self: gimli.GimliSolver, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = original(self, *args, **kwargs)
        out["hypers.weight_decay"] = torch.zeros_like(out["hypers.weight_decay"])
        return out

    monkeypatch.setattr(gimli.GimliSolver, "hypergradient", corrupted)
    rows = {p.name: p for p in gimli.check(solver, batches[:3], batches[3]).params}
    assert rows["hypers.weight_decay"].status == "FAIL" and rows["hypers.lr"].passed


# --- (b) hypergradients that are zero up to rounding ---------------------------------------
def batchnorm(kind: str, seed: int) -> tuple[gimli.GimliSolver, list[Any]]:
    """A Linear bias feeding BatchNorm (its hypergradient is 0, computed as rounding noise
    in both gimli and autograd), and a loss parameter that reaches nothing (exactly 0)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, nesterov=True) if kind == "SGD"
           else torch.optim.Adadelta(model.parameters(), lr=0.5))
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, loss={"c": torch.tensor(0.5, dtype=torch.float64)},
                            init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]) + meta["c"], opt, meta,
                               val_loss_fn=lambda m, b, meta: F.mse_loss(m(b[0]), b[1]))
    g = torch.Generator().manual_seed(seed)
    return solver, [(torch.randn(8, 3, generator=g, dtype=torch.float64),
                     torch.randn(8, 1, generator=g, dtype=torch.float64)) for _ in range(4)]


@pytest.mark.parametrize("kind,seed", [("SGD", 2), ("Adadelta", 0)])
def test_zero_up_to_rounding_passes_and_a_wrong_one_fails(monkeypatch: pytest.MonkeyPatch,
                                                          kind: str, seed: int) -> None:
    solver, batches = batchnorm(kind, seed)
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed, str(report)
    rows = {p.name: p for p in report.params}
    assert rows["init.0.bias"].zero and rows["loss.c"].zero and rows["init.0.bias"].elements == 4
    assert not any(p.zero for n, p in rows.items() if n not in ("init.0.bias", "loss.c"))
    # the same bias hypergradient off by a millionth of its weight's: no longer zero at this scale
    original = gimli.GimliSolver.hypergradient

    def corrupted(self: gimli.GimliSolver, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = original(self, *args, **kwargs)
        out["init.0.bias"] = out["init.0.bias"] + 1e-6 * out["init.0.weight"].abs().max()
        return out

    monkeypatch.setattr(gimli.GimliSolver, "hypergradient", corrupted)
    rows = {p.name: p for p in gimli.check(solver, batches[:3], batches[3]).params}
    assert not rows["init.0.bias"].passed
    assert rows["init.0.bias"].autograd_error > 1e-4 and rows["init.0.bias"].fd_error > 1e-4


@pytest.mark.parametrize("kind", ["Adagrad", "RMSprop"])
def test_rounding_the_unroll_amplifies(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A zero bias feeding BatchNorm, under an optimizer in its eps regime with coupled
    weight decay: each step multiplies the bias's perturbation by ~1 − lr·λ/eps, so its
    (truly zero) hypergradient is rounding noise amplified ~10¹⁰-fold, in gimli as in
    autograd. The check allows ±R_p for it (estimated by gimli's sweep on random w·θ_J)
    and says so; the other meta-parameters keep their tolerance: a corrupted lr fails."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].bias.zero_()
    opt = (torch.optim.Adagrad(model.parameters(), lr=0.05, eps=1e-6, weight_decay=0.1) if kind == "Adagrad"
           else torch.optim.RMSprop(model.parameters(), lr=0.01, eps=1e-7, weight_decay=0.1))
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt,
                               gimli.MetaParams(opt, ["lr"], init=model))
    batches = regression_batches(1, 3, 1, 4, size=8)
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed, str(report)
    rows = {p.name: p for p in report.params}
    assert rows["init.0.bias"].limited and rows["init.0.bias"].elements == 4 and "rounding ±" in str(report)
    assert not any(p.limited for n, p in rows.items() if n != "init.0.bias"), str(report)
    corrupt_lr(monkeypatch, adagrad if kind == "Adagrad" else rmsprop, 1.0 + 1e-4)
    lr = {p.name: p for p in gimli.check(solver, batches[:3], batches[3]).params}["hypers.lr"]
    assert lr.status == "FAIL" and lr.autograd_error > 5e-5 and lr.fd_error > 5e-5


# --- kinks within the finite-difference step -------------------------------------------------
def test_kinks_are_resolved_judged_one_sidedly_or_skipped_not_failed() -> None:
    """Three ReLU kinks in θ₀, in the pre-activations of the training batch: unit 0's on
    sample 0 is 0.3·h below 0 (central differences at h straddle it; one-sided ones on the
    side away from it do not, nor do central ones at h/16); unit 1's on samples 1 and 2 are
    ±1e-12 (every step size, on either side, straddles one: skipped, and counted); unit 2's
    on sample 3 is exactly 0 (the derivative there is one-sided, and gimli's, like
    autograd's, is the inactive side's)."""
    h = 1e-5 * 0.8                  # the step for θ₀ entries of size 0.8
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    x = torch.tensor([[1.0], [(1.35 + 1e-12) / 0.9], [(1.35 - 1e-12) / 0.9], [0.5], [-1.0], [2.0]],
                     dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0], [-1.0], [0.5], [0.3], [-0.2]], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.8], [0.9], [-0.6]], dtype=torch.float64))
        model[0].bias.copy_(torch.tensor([-0.8 - 0.3 * h, -1.35, 0.3], dtype=torch.float64))
        model[2].weight.copy_(torch.tensor([[0.7, -0.4, 0.5]], dtype=torch.float64))
        pre = model[0](x)
    assert abs(pre[0, 0] + 0.3 * h) < 1e-15 and abs(pre[1, 1]) < 2e-12 and pre[1, 1] * pre[2, 1] < 0
    assert pre[3, 2] == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, gimli.MetaParams(init=model))
    val = (torch.tensor([[1.5], [0.7]], dtype=torch.float64), torch.tensor([[0.2], [0.9]], dtype=torch.float64))
    report = gimli.check(solver, [(x, y)], val)
    assert report.passed, str(report)
    rows = {p.name: p for p in report.params}
    for name in ("init.0.weight", "init.0.bias"):
        assert (rows[name].elements, rows[name].one_sided, rows[name].skipped) == (2, 2, 1), str(report)
        assert rows[name].fd_error <= 1e-6
    assert rows["init.2.weight"].skipped == 0 and "2 one-sided, 1 kink" in str(report)


# --- the copy computes in float64 and locally -------------------------------------------
def test_float32_setup_checked_in_float64_scalars() -> None:
    """NAdam keeps its μ-product in the default dtype: the float64 copy runs under a float64
    default (else finite differences see float32 rounding steps), restored afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.NAdam(model.parameters(), lr=0.01, momentum_decay=4e-3)
    meta = gimli.MetaParams(opt, ["momentum_decay", "beta1"])
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta)
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed and all(p.elements > 0 and p.fd_error <= 1e-6 for p in report.params), str(report)
    assert torch.get_default_dtype() == torch.float32


def test_checked_in_float32_the_tolerance_is_float32s(monkeypatch: pytest.MonkeyPatch) -> None:
    """dtype=None on a float32 model: two exact float32 unrolls differ by ~1e-4, so the
    autograd tolerance is 10⁶·ε (0.12), not float64's 1e-8; a dropped lr still fails."""
    solver, batches = setup(dropout=0.0)
    report = gimli.check(solver, batches[:3], batches[3], dtype=None)
    assert report.passed and report.dtype == torch.float32 and report.rtol == 1e6 * 2.0 ** -23, str(report)
    corrupt_lr(monkeypatch, adam, 0.0)
    lr = {p.name: p for p in gimli.check(solver, batches[:3], batches[3], dtype=None).params}["hypers.lr"]
    assert lr.status == "FAIL" and lr.autograd_error == 1.0


def test_muon_judged_by_autograd_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Muon's bfloat16 Newton–Schulz makes L^val a staircase, differentiated straight
    through: no finite differences (the report says why); a corrupted lr still fails."""
    from gimli.optim import muon

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False))
    opt = torch.optim.Muon(model.parameters(), lr=0.02, momentum=0.9)
    meta = gimli.MetaParams(opt, ["lr", "momentum", "ns_a"], init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta)
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(3)]
    report = gimli.check(solver, batches[:2], batches[2])
    assert report.passed and all(p.elements == 0 for p in report.params), str(report)
    assert "no finite differences: Muon" in str(report)
    corrupt_lr(monkeypatch, muon, 1.0 + 1e-4)
    lr = {p.name: p for p in gimli.check(solver, batches[:2], batches[2]).params}["hypers.lr"]
    assert lr.status == "FAIL" and lr.autograd_error > 5e-5


def test_a_frozen_meta_parameter_has_no_row() -> None:
    """A meta-parameter with requires_grad=False is a constant: no hypergradient, no row."""
    solver, batches = setup(dropout=0.0)
    solver.problem.module[0].bias.requires_grad_(False)
    report = gimli.check(solver, batches[:3], batches[3])
    assert report.passed and report.verified, str(report)
    assert "init.0.bias" not in {p.name for p in report.params} and "init.0.weight" in str(report)


def _rank_solver(distributed: bool | None) -> gimli.GimliSolver:
    torch.manual_seed(0)
    model = mlp([2, 3, 1], "tanh")
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, init=model)
    return gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, distributed=distributed)


def _check_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))    # a check that communicates fails fast
    try:
        batches = regression_batches(rank, 2, 1, 3)        # each rank its own data
        report = gimli.check(_rank_solver(False), batches[:2], batches[2])
        Path(out, f"every{rank}").write_text(str(report))
        done = Path(out, "alone")
        if rank == 0:                                       # rank 1 is not in any collective
            report = gimli.check(_rank_solver(None), batches[:2], batches[2])
            done.write_text(str(report))
        else:
            deadline = time.monotonic() + 120
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        dist.barrier()
    finally:
        _finish()


def test_check_under_torch_distributed_is_local(tmp_path: Path) -> None:
    """Two gloo processes: check on every rank with different data passes on each (it
    compares each rank's own hypergradient), and check on one rank only returns."""
    mp.spawn(_check_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    for name in ("every0", "every1", "alone"):
        text = (tmp_path / name).read_text()
        assert any(line.startswith("PASS:") for line in text.splitlines()), text


def test_eval_mode_validation_loss_reading_running_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """L^val in eval mode reads BatchNorm's running statistics, which the unroll updates
    without gradients (as torch does): the hypergradient treats them as constants, and
    so do the finite differences (buffers held at the unperturbed unroll's). A
    corrupted hypergradient still fails."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meta = gimli.MetaParams(opt, ["lr"], init=model)
    data = regression_batches(2, 3, 1, 4, size=8)
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta,
                               val_loss_fn=lambda m, b, meta: F.mse_loss(m.eval()(b[0]), b[1]))
    report = gimli.check(solver, data[:3], data[3])
    assert report.passed, str(report)
    assert all(p.elements > 0 for p in report.params)
    exact = gimli.GimliSolver.hypergradient

    def corrupted(self: gimli.GimliSolver, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        grads = exact(self, *args, **kwargs)
        return {**grads, "hypers.lr": grads["hypers.lr"] * (1 + 1e-4)}

    monkeypatch.setattr(gimli.GimliSolver, "hypergradient", corrupted)
    assert not gimli.check(solver, data[:3], data[3]).passed


def test_composite_scheduler_followed_since_the_solver_was_built() -> None:
    """lr learned under SequentialLR, which has stepped since the solver was built: the
    check's copy follows the schedule from the solver's shadows (a new solver could
    not start them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    L = torch.optim.lr_scheduler
    sched = L.SequentialLR(opt, [L.LinearLR(opt, start_factor=0.2, total_iters=3),
                                 L.CosineAnnealingLR(opt, T_max=8)], milestones=[3])
    meta = gimli.MetaParams(opt, ["lr"])
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta,
                               scheduler=sched, meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2))
    data = regression_batches(3, 3, 1, 4, size=8)
    for _ in range(2):
        solver.step(data[:3], data[3], commit=True)
    report = gimli.check(solver, data[:3], data[3])
    assert report.passed, str(report)


def test_kink_at_the_end_of_a_valid_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adafactor's default d = 1 is the end of its valid range (d ≥ 1), and at the first
    step L^val has a kink exactly there (RMS clipping at ratio 1, the tie where autograd
    takes the mean of both sides): gimli's value lies between the one-sided derivatives
    and passes; 5 % off, it fails."""
    if getattr(torch.optim, "Adafactor", None) is None:
        pytest.skip("this torch has no Adafactor")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = torch.optim.Adafactor(model.parameters(), lr=0.02)
    meta = gimli.MetaParams(opt, {"d": "tensor"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta)
    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64))]
    val = (torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64))
    report = gimli.check(solver, train, val)
    assert report.passed and report.params[0].one_sided > 0, str(report)
    exact = gimli.GimliSolver.hypergradient

    def corrupted(self: gimli.GimliSolver, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        grads = exact(self, *args, **kwargs)
        return {**grads, "hypers.d": grads["hypers.d"] * 1.05}

    monkeypatch.setattr(gimli.GimliSolver, "hypergradient", corrupted)
    assert not gimli.check(solver, train, val).passed
