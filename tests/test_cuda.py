"""The same promises on a GPU (skipped where CUDA is not available): hypergradients equal
the CPU's and the autograd unroll's, a failed step restores the GPU's random state (a
retry draws the same dropout masks), a commit equals real torch.optim training, a
checkpoint resumes bit-identically, and gimli.check passes.

Oracles: the same computation on the CPU in float64; the full autograd unroll; the real
torch.optim loop on the GPU; an uninterrupted run."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
L = torch.optim.lr_scheduler


def build(device: str, dropout: float = 0.0, seed: int = 0) -> tuple[gimli.GimliSolver, list[Any], Any]:
    """BatchNorm, dropout, Adam over two groups with per-group log lrs under a warm-up then
    cosine schedule, an L2 coefficient and θ₀: most of what a step touches."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout),
                          nn.Linear(8, 1)).double().to(device)
    opt = torch.optim.Adam([{"params": model[0].parameters()},
                            {"params": list(model[1].parameters()) + list(model[4].parameters()), "lr": 0.02}],
                           lr=0.01, weight_decay=1e-3)
    sched = L.SequentialLR(opt, [L.LinearLR(opt, start_factor=0.5, total_iters=2),
                                 L.CosineAnnealingLR(opt, T_max=10)], milestones=[2])
    meta = gimli.MetaParams(opt, {"lr": "group", "beta2": "scalar"}, transform={"lr": "log", "beta2": "logit"},
                            loss={"l2": torch.tensor(1e-3, dtype=torch.float64, device=device)}, init=model)

    def loss_fn(m: Any, batch: Any, meta: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y) + meta["l2"] * sum((p ** 2).sum() for p in m.parameters())

    solver = gimli.GimliSolver(model, loss_fn, opt, meta, scheduler=sched,
                               val_loss_fn=lambda m, b, meta: F.mse_loss(m(b[0]), b[1]),
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, generator=g, dtype=torch.float64).to(device),
             torch.randn(16, 1, generator=g, dtype=torch.float64).to(device)) for _ in range(4)]
    return solver, data[:3], data[3]


def test_hypergradient_equals_the_cpus_and_the_autograd_unroll() -> None:
    gpu, train, val = build("cuda")
    cpu, train_cpu, val_cpu = build("cpu")
    ours = gpu.hypergradient(train, val)
    reference = gimli.full_unroll_hypergradient(gpu, train, val)
    on_cpu = cpu.hypergradient(train_cpu, val_cpu)
    for name, g in ours.items():
        assert g.is_cuda
        torch.testing.assert_close(g, reference[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g.cpu(), on_cpu[name], rtol=1e-9, atol=1e-12)


def test_retried_step_draws_the_same_dropout_masks_on_the_gpu() -> None:
    clean, train, val = build("cuda", dropout=0.3)
    torch.manual_seed(5)
    expected = [clean.step(train, val) for _ in range(2)]
    faulty, train, val = build("cuda", dropout=0.3)
    torch.manual_seed(5)
    original = faulty.problem.val_loss_fn

    def broken(m: Any, b: Any, meta: Any) -> torch.Tensor:
        raise RuntimeError("transient")

    faulty.problem.val_loss_fn = broken
    with pytest.raises(RuntimeError, match="transient"):
        faulty.step(train, val)
    faulty.problem.val_loss_fn = original
    assert [faulty.step(train, val) for _ in range(2)] == expected


def test_commit_equals_torch_optim_on_the_gpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double().cuda()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.01)
    solver = gimli.GimliSolver(model, lambda m, b, meta: F.mse_loss(m(b[0]), b[1]), opt,
                               gimli.MetaParams(opt, ["lr"]))
    _, train, val = build("cuda")
    solver.hypergradient(train, val, commit=True)
    for batch in train:
        twin_opt.zero_grad()
        F.mse_loss(twin(batch[0]), batch[1]).backward()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_checkpoint_resumes_bit_identically_on_the_gpu() -> None:
    solver, train, val = build("cuda", dropout=0.2)
    solver.step(train, val, commit=False)
    buffer = io.BytesIO()
    torch.save({"solver": solver.state_dict(), "model": solver.problem.module.state_dict(),
                "opt": solver.problem.inner.torch_optimizer.state_dict(),
                "sched": solver.problem.scheduler.state_dict(),
                "rng": torch.cuda.get_rng_state_all()}, buffer)
    went_on = [solver.step(train, val) for _ in range(2)]
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, _, _ = build("cuda", dropout=0.2, seed=3)
    resumed.problem.module.load_state_dict(saved["model"])
    resumed.problem.inner.torch_optimizer.load_state_dict(saved["opt"])
    resumed.problem.scheduler.load_state_dict(saved["sched"])
    resumed.load_state_dict(saved["solver"])
    torch.cuda.set_rng_state_all(saved["rng"])
    assert [resumed.step(train, val) for _ in range(2)] == went_on


def test_check_passes_on_the_gpu() -> None:
    solver, train, val = build("cuda")
    report = gimli.check(solver, train, val)
    assert report.passed, str(report)
