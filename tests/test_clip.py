"""Gradient clipping inside the unroll (``GimliSolver(clip=...)``): the unroll clips as the
user's training loop does, and the hypergradient through it is exact.

Oracles, float64: the real training loop (``loss.backward()``,
``torch.nn.utils.clip_grad_norm_`` or ``clip_grad_value_``, ``opt.step()`` of the real
``torch.optim``) for the trajectory; central finite differences of that real loop's
validation loss for the hypergradient, the learned threshold included; and the full
autograd unroll (``gimli.full_unroll_hypergradient``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from strategies import mlp, regression_batches
from test_sweep import assert_hypergradients_close

BATCHES = regression_batches(11, 3, 2, 7, size=8)
TRAIN, VAL = BATCHES[:6], BATCHES[6]
with torch.random.fork_rng():
    torch.manual_seed(5)
    START = mlp([3, 6, 2], "tanh")          # the same weights whatever ran before
# thresholds that bind at some steps and not others (the unclipped run's gradient norms
# are 0.90, 0.66, 0.42, 1.13, 1.30, 1.53; largest entries 0.57, 0.33, 0.18, 0.74, 0.66, 0.82;
# real_loop asserts it of the clipped runs)
CLIPS = {"norm": (torch.nn.utils.clip_grad_norm_, 0.7), "value": (torch.nn.utils.clip_grad_value_, 0.45),
         "norm-inf": (lambda p, v: torch.nn.utils.clip_grad_norm_(p, v, norm_type=float("inf")), 0.5)}


def clip_of(kind: str, threshold: Any) -> Any:
    if kind == "value":
        return gimli.ClipGradValue(threshold)
    return gimli.ClipGradNorm(threshold, norm_type=float("inf") if kind == "norm-inf" else 2.0)


def loss(m: Any, batch: Any, meta: Any = None) -> torch.Tensor:
    return F.mse_loss(m(batch[0]), batch[1])


def real_loop(kind: str, lr: float, threshold: float, momentum: float = 0.9) -> tuple[nn.Module, float]:
    """The user's training loop, with torch's own clipping; L^val after it."""
    model = copy.deepcopy(START)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    fn = CLIPS[kind][0]
    clipped = 0
    for batch in TRAIN:
        opt.zero_grad()
        loss(model, batch).backward()
        before = [p.grad.clone() for p in model.parameters()]
        fn(model.parameters(), threshold)
        clipped += any(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
        opt.step()
    assert 0 < clipped < len(TRAIN), clipped        # the clip binds at some steps only
    with torch.no_grad():
        return model, loss(model, VAL).item()


def solver(kind: str, learned: bool) -> gimli.GimliSolver:
    model = copy.deepcopy(START)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    threshold = CLIPS[kind][1]
    loss_entries = {"log_threshold": torch.tensor(threshold, dtype=torch.float64).log()} if learned else {}
    meta = gimli.MetaParams(opt, {"lr": "scalar"}, loss=loss_entries)
    clip = clip_of(kind, (lambda meta: meta["log_threshold"].exp()) if learned else threshold)
    return gimli.GimliSolver(model, loss, opt, meta, clip=clip)


@pytest.mark.parametrize("kind", list(CLIPS))
def test_unroll_clips_as_the_training_loop(kind: str) -> None:
    s = solver(kind, learned=False)
    s.hypergradient(TRAIN, VAL, commit=True)                   # the unroll's end, written back
    real, _ = real_loop(kind, 0.1, CLIPS[kind][1])
    for p, q in zip(s.problem.module.parameters(), real.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(CLIPS))
def test_hypergradient_through_clipping_is_exact(kind: str) -> None:
    s = solver(kind, learned=True)
    got = s.hypergradient(TRAIN, VAL)
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(s, TRAIN, VAL))
    # central differences of the real loop in lr and in the log-threshold
    threshold = CLIPS[kind][1]
    h = 1e-5
    d_lr = (real_loop(kind, 0.1 + h, threshold)[1] - real_loop(kind, 0.1 - h, threshold)[1]) / (2 * h)
    d_log = (real_loop(kind, 0.1, threshold * math.exp(h))[1]
             - real_loop(kind, 0.1, threshold * math.exp(-h))[1]) / (2 * h)
    assert got["hypers.lr"].item() == pytest.approx(d_lr, rel=1e-6, abs=1e-10)
    assert got["loss.log_threshold"].item() == pytest.approx(d_log, rel=1e-6, abs=1e-10)
    assert abs(d_log) > 1e-6                    # the threshold matters: the test can fail


def test_clip_arguments() -> None:
    model = copy.deepcopy(START)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    with pytest.raises(TypeError, match="ClipGradNorm"):
        gimli.GimliSolver(model, loss, opt, meta, clip=1.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        gimli.GimliSolver(model, loss, opt, meta, clip=gimli.ClipGradNorm(0.0))
    with pytest.raises(ValueError, match="gradient clipping"):
        gimli.GimliSolver(model, loss, opt, meta, clip=gimli.ClipGradNorm(1.0), mode="forward")
