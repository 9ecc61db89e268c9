"""Meta-batches of tasks, and the same meta-update across processes with torch.distributed.

Oracles: per-task hypergradients (and the full autograd unroll) averaged by hand; and
a single process stepping on all the tasks, against two gloo processes stepping on
half of them each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gimli
from strategies import mlp, mse, regression_batches

TASKS = 4
STEPS = 3


def build(kind: str) -> tuple[gimli.GimliSolver, list[tuple[Any, Any]]]:
    """The same problem in every process: seeded model, optimizer and tasks."""
    torch.manual_seed(0)
    model = mlp([2, 5, 1], "tanh")
    params = list(model.parameters())
    opt: Any
    if kind in ("maml", "imaml"):
        opt = torch.optim.SGD(params, lr=0.1)
        meta = gimli.MetaParams(init=model)
    elif kind == "several":             # SGD with momentum on layer 1, Adam on layer 2
        opt = [torch.optim.SGD(params[:2], lr=0.1, momentum=0.9), torch.optim.Adam(params[2:], lr=0.02)]
        meta = gimli.MetaParams(opt, {"lr": "group", "beta1": "scalar"})
    else:
        opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.02)
        meta = gimli.MetaParams(opt, {"lr": "group", "beta1": "scalar"})
    mode = {"lrs_forward": "forward", "imaml": "implicit"}.get(kind, "reverse")
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2), mode=mode,
                               implicit=gimli.Implicit(method="dense", proximal=1.0) if kind == "imaml" else None)
    tasks = []
    for t in range(TASKS):
        batches = regression_batches(10 + t, 2, 1, STEPS + 1)
        tasks.append((batches[:STEPS], batches[STEPS]))
    return solver, tasks


@pytest.mark.parametrize("kind", ["maml", "lrs", "lrs_forward", "several"])
def test_meta_batch_is_the_mean_of_the_tasks(kind: str) -> None:
    solver, tasks = build(kind)
    got = solver.hypergradient(tasks=tasks)
    each = [gimli.full_unroll_hypergradient(solver, train, val) for train, val in tasks]
    for name, g in got.items():
        torch.testing.assert_close(g, sum(e[name] for e in each) / len(each), rtol=1e-10, atol=1e-13)
    result = solver.step(tasks=tasks)
    assert math.isfinite(result.val_loss) and len(result.train_losses) == STEPS


def test_meta_batch_arguments() -> None:
    solver, tasks = build("lrs")
    with pytest.raises(ValueError, match="not both"):
        solver.hypergradient(tasks[0][0], tasks[0][1], tasks=tasks)
    with pytest.raises(ValueError, match="no task"):
        solver.hypergradient(tasks=[])
    with pytest.raises(ValueError, match="commit"):
        solver.step(tasks=tasks, commit=True)


def _finish() -> None:
    """Tear down the process group, and leave a worker that went through without running
    C++ static destructors: gloo's threads can abort a process at exit ("terminate
    called without an active exception", about 1 run in 15 here, with or without
    gimli), which would fail a test whose results are already written."""
    import os
    import sys

    failed = sys.exc_info()[0] is not None
    dist.destroy_process_group()
    if not failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _worker(rank: int, world: int, init: str, kind: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        solver, tasks = build(kind)
        mine = tasks[rank::world]
        for _ in range(2):
            solver.step(tasks=mine)
            solver.check_replicas()
        torch.save({n: p.detach() for n, p in solver.meta.named_parameters()}, f"{out}/rank{rank}.pt")
    finally:
        _finish()


@pytest.mark.parametrize("kind", ["maml", "lrs", "lrs_forward", "several", "imaml"])
def test_two_processes_equal_one(kind: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/store", kind, str(tmp_path)), nprocs=2, join=True)
    solver, tasks = build(kind)
    for _ in range(2):
        solver.step(tasks=tasks[0::2] + tasks[1::2])      # the same tasks, in one process
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, p in solver.meta.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name          # identical replicas
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(p.detach(), q) for (_, p), q in
               zip(build(kind)[0].meta.named_parameters(), ranks[0].values()))   # they moved


def _faulty_worker(rank: int, world: int, init: str, fault: str, out: str) -> None:
    """Three meta-steps; at the second, rank 1 alone meets a fault. Every rank must undo
    (or skip) that step together and go on; the results and losses are recorded."""
    import datetime
    import warnings

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        solver, tasks = build("lrs")
        mine = tasks[rank::world]
        outcomes: list[Any] = []
        for k in range(3):
            batches = mine
            if k == 1 and rank == 1:
                train, val = mine[0]
                if fault == "nan":
                    x, y = train[1]
                    batches = [([train[0], (x, y * float("nan"))] + train[2:], val)] + mine[1:]
                else:
                    batches = [([train[0], (x[:, :1], y)] + train[2:], val)  # a shape error
                               for x, y in [train[1]]] + mine[1:]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result = solver.step(tasks=batches, on_nonfinite="skip")
                    outcomes.append(("skipped" if result.skipped else "ok", result.val_loss,
                                     result.train_losses, [str(w.message) for w in caught]))
                except Exception as e:          # noqa: BLE001 - recorded for the test
                    outcomes.append(("raised", type(e).__name__, str(e), []))
        solver.check_replicas()
        torch.save({"meta": {n: p.detach() for n, p in solver.meta.named_parameters()},
                    "outcomes": outcomes}, f"{out}/rank{rank}.pt")
    finally:
        _finish()


@pytest.mark.parametrize("fault", ["nan", "exception"])
def test_ranks_agree_on_a_failure(fault: str, tmp_path: Path) -> None:
    """Oracle: one process stepping on all the tasks at the first and third meta-steps
    only (the second is skipped or raised on every rank, never applied on some)."""
    mp.spawn(_faulty_worker, args=(2, f"file://{tmp_path}/store", fault, str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    solver, tasks = build("lrs")
    expected = [solver.step(tasks=tasks[0::2] + tasks[1::2]) for _ in range(2)]
    for r, saved in enumerate(ranks):
        first, second, third = saved["outcomes"]
        if fault == "nan":
            assert second[0] == "skipped", (r, second)
            assert any("non-finite" in w for w in second[3]), (r, second)
        else:
            assert second[0] == "raised", (r, second)
            assert (second[1] == "RuntimeError" and "rank(s) 1" in second[2]) if r == 0 else \
                second[1] != "RuntimeError" or "rank(s)" not in second[2]
        for got, want in ((first, expected[0]), (third, expected[1])):
            assert got[0] == "ok"
            assert got[1] == pytest.approx(want.val_loss, rel=1e-12)           # every rank's tasks
            assert got[2] == pytest.approx(want.train_losses, rel=1e-12)       # (item 24)
        for name, p in solver.meta.named_parameters():
            assert torch.equal(saved["meta"][name], ranks[0]["meta"][name]), name
            torch.testing.assert_close(saved["meta"][name], p.detach(), rtol=1e-12, atol=1e-14)


def test_distributed_example_under_torchrun() -> None:
    """examples/distributed_maml.py --quick under torchrun with 2 CPU processes (gloo) gives
    the single-process run's post-adaptation MSE (adapted with the real torch.optim.SGD),
    up to float32 summation order, and meta-training lowered it."""
    import re
    import subprocess
    import sys

    from test_examples import EXAMPLES, load

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(EXAMPLES / "distributed_maml.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = re.search(r"2 process\(es\): .* before ([\d.]+), after ([\d.]+)", run.stdout)
    assert found, run.stdout
    before, after = float(found[1]), float(found[2])
    single = load("distributed_maml").main(["--quick"])
    assert single["world"] == 1 and after < before
    assert before == pytest.approx(single["before"], rel=1e-4)
    assert after == pytest.approx(single["after"], rel=1e-4)
