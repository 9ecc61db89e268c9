"""Batches the solver draws itself: a failed step gives its batches back, a resumed run
finds its place (a shuffling DataLoader included), and a one-shot iterator says so.

Oracles: the batches an uninterrupted run draws, compared by identity or value; a run
that never failed; a run that was never interrupted."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gimli
from gimli._data import Stream


def test_stream_rewind_gives_batches_back_across_passes() -> None:
    data = list(range(5))
    stream = Stream(data, "train_data")
    assert stream.take(3) == [0, 1, 2]
    stream.settle()
    mark = stream.mark()
    assert stream.take(4) == [3, 4, 0, 1]               # across the end of a pass
    stream.rewind(mark)
    assert stream.position()["epoch"] == 0 and stream.position()["index"] == 3
    assert stream.take(4) == [3, 4, 0, 1]               # the same batches again
    assert stream.position()["epoch"] == 1 and stream.position()["index"] == 2
    assert stream.take(1) == [2]


def test_one_shot_iterator_says_it_ran_out() -> None:
    stream = Stream((i for i in range(3)), "train_data")
    assert stream.take(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="iterator.*generator.*run out after 3 batches"):
        stream.take(1)
    with pytest.raises(ValueError, match="yields no batches"):
        Stream([], "val_data").take(1)


def setup(data: Any, seed: int = 0, val: Any = None) -> gimli.GimliSolver:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    return gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt, meta,
                             meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2), steps=2,
                             train_data=data, val_data=data if val is None else val)


def dataset(n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, generator=g, dtype=torch.float64),
                         torch.randn(n, 1, generator=g, dtype=torch.float64))


def test_failed_step_consumes_no_batch() -> None:
    """A step that fails (here: the loss raises on the third batch it sees) leaves the
    data position as it was: the following steps are those of a run without the fault."""
    clean = setup(DataLoader(dataset(), batch_size=2))
    faulty = setup(DataLoader(dataset(), batch_size=2))
    calls = {"n": 0}
    original = faulty.problem.loss_fn

    def flaky(m: Any, b: Any, meta: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a transient fault")
        return original(m, b, meta)

    faulty.problem.loss_fn = flaky
    with pytest.raises(RuntimeError, match="transient"):
        faulty.step()
    faulty.problem.loss_fn = original
    assert faulty.state_dict()["data"]["train"]["index"] == 0
    for _ in range(5):
        assert faulty.step() == clean.step()


def test_skipped_step_moves_past_its_batches() -> None:
    """A step skipped for a non-finite value (on_nonfinite="skip") uses up its batches, so
    the run moves past a bad batch instead of meeting it again; nothing else changes."""
    batches = [b for b in DataLoader(dataset(), batch_size=2)]
    poisoned = list(batches)
    poisoned[1] = (poisoned[1][0], poisoned[1][1] * float("nan"))
    faulty = setup(poisoned, val=batches)
    clean = setup(batches, val=batches)
    clean.train_data.take(2)                            # the batches the skipped step used up
    clean.val_data.take(1)
    with pytest.warns(RuntimeWarning, match="skipped.*training batch 1 .*NaN"):
        assert faulty.step(on_nonfinite="skip").skipped
    for _ in range(2):                                  # the rest of this pass
        assert faulty.step() == clean.step()


def resumed(solver: gimli.GimliSolver, build: Any) -> gimli.GimliSolver:
    """A crash and a resume: the checkpoint (solver, model, optimizer and torch's random
    state) through torch.save/torch.load(weights_only=True), loaded into a solver built
    afresh, in a process whose random state was elsewhere until the checkpoint is loaded."""
    buffer = io.BytesIO()
    torch.save({"solver": solver.state_dict(), "rng": torch.get_rng_state(),
                "model": solver.problem.module.state_dict(),
                "opt": solver.problem.inner.torch_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(999)
    fresh = build()
    fresh.problem.module.load_state_dict(saved["model"])
    fresh.problem.inner.torch_optimizer.load_state_dict(saved["opt"])
    fresh.load_state_dict(saved["solver"])
    torch.set_rng_state(saved["rng"])
    return fresh


def test_shuffled_dataloader_resumes_bit_identically() -> None:
    """A DataLoader with shuffle=True draws each pass's permutation from torch's global
    random state; the resumed run deals the same batches in the same order."""
    def loaders() -> tuple[DataLoader, DataLoader]:
        return (DataLoader(dataset(10), batch_size=3, shuffle=True),
                DataLoader(dataset(4), batch_size=2, shuffle=True))

    def run(resume_after: int | None) -> list[Any]:
        solver = setup(*loaders()[:1], val=loaders()[1])
        torch.manual_seed(123)
        results = []
        for k in range(7):
            if resume_after is not None and k == resume_after:
                solver = resumed(solver, lambda: setup(loaders()[0], seed=5, val=loaders()[1]))
            results.append(solver.step(commit=True))
        return results

    uninterrupted = run(None)
    for k in (1, 3, 4):                                 # mid-pass, and at a pass boundary
        assert run(k) == uninterrupted


def test_dataloader_with_its_own_generator_resumes() -> None:
    def loader(seed: int) -> DataLoader:
        return DataLoader(dataset(10), batch_size=3, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    solver = setup(loader(7), val=loader(8))
    for _ in range(4):
        solver.step(commit=True)
    state = copy.deepcopy(solver.state_dict())
    weights = copy.deepcopy(solver.problem.module.state_dict())
    inner = copy.deepcopy(solver.problem.inner.torch_optimizer.state_dict())
    went_on = [solver.step(commit=True) for _ in range(4)]
    resumed = setup(loader(7), seed=3, val=loader(8))   # fresh generators, other weights
    resumed.problem.module.load_state_dict(weights)
    resumed.problem.inner.torch_optimizer.load_state_dict(inner)
    resumed.load_state_dict(state)
    assert [resumed.step(commit=True) for _ in range(4)] == went_on


def test_generator_as_train_data() -> None:
    def batches() -> Any:
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            yield torch.randn(4, 3, generator=g, dtype=torch.float64), \
                torch.randn(4, 1, generator=g, dtype=torch.float64)

    solver = setup(batches())
    solver.val_data = Stream([next(batches())], "val_data")
    solver.step()
    with pytest.raises(ValueError, match="train_data is an iterator"):
        solver.step()


def test_resume_after_a_failed_step_that_started_a_new_pass() -> None:
    """A step draws the last batch of a pass and the first of the next (a shuffling
    DataLoader deals the new permutation), then fails; it gives both back. A checkpoint
    taken then must carry the new pass's random state too, or the resumed run deals
    another permutation."""
    def loaders() -> tuple[DataLoader, DataLoader]:
        return DataLoader(dataset(9), batch_size=3, shuffle=True), DataLoader(dataset(4), batch_size=4)

    def run(resume: bool) -> list[Any]:
        torch.manual_seed(42)
        solver = setup(loaders()[0], val=loaders()[1])
        original = solver.problem.loss_fn
        solver.step()                                   # batches 0, 1 of pass 0
        solver.problem.loss_fn = lambda m, b, meta: (_ for _ in ()).throw(RuntimeError("transient"))
        with pytest.raises(RuntimeError, match="transient"):
            solver.step()                               # draws batch 2 of pass 0, 0 of pass 1
        solver.problem.loss_fn = original
        if resume:
            solver = resumed(solver, lambda: setup(loaders()[0], seed=3, val=loaders()[1]))
        return [solver.step(commit=True) for _ in range(4)]

    assert run(resume=True) == run(resume=False)
