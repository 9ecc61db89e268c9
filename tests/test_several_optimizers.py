"""Several optimizers in one solver (``GimliSolver(model, loss_fn, [opt_a, opt_b], meta)``): each
tensor is stepped by the optimizer that holds it, as a training loop that calls ``step()`` on
each would, and the hypergradient through all of them is exact.

Oracles, float64: the real training loop (``backward()`` then every optimizer's ``step()``,
and every scheduler's) for the trajectory and the optimizers' state; central finite
differences of that real loop's validation loss for the hypergradient; the full autograd
unroll (``gimli.full_unroll_hypergradient``).
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

BATCHES = regression_batches(23, 3, 2, 7, size=8)
TRAIN, VAL = BATCHES[:6], BATCHES[6]
with torch.random.fork_rng():
    torch.manual_seed(3)
    START = mlp([3, 6, 2], "tanh")          # Linear, Tanh, Linear; the same weights whatever ran before


def loss(m: Any, batch: Any, meta: Any = None) -> torch.Tensor:
    return F.mse_loss(m(batch[0]), batch[1])


def build(combo: str, lrs: tuple[float, ...] = (), beta1: float = 0.9,
          schedule: bool = False) -> tuple[nn.Module, list[torch.optim.Optimizer], list[Any]]:
    """A fresh model and the combination's optimizers (and schedulers): ``lrs`` the base lr of
    each param group, end to end in the list's order."""
    model = copy.deepcopy(START)
    first, second = model[0], model[2]
    if combo == "sgd+adam":         # SGD (momentum) on layer 1; Adam, two groups, on layer 2
        lrs = lrs or (0.1, 0.01, 0.02)
        opts: list[torch.optim.Optimizer] = [
            torch.optim.SGD(first.parameters(), lr=lrs[0], momentum=0.9),
            torch.optim.Adam([{"params": [second.weight]}, {"params": [second.bias], "lr": lrs[2]}],
                             lr=lrs[1], betas=(beta1, 0.999))]
    elif combo == "adam+sgd":       # the same, listed the other way round
        lrs = lrs or (0.01, 0.02, 0.1)
        opts = [torch.optim.Adam([{"params": [second.weight]}, {"params": [second.bias], "lr": lrs[1]}],
                                 lr=lrs[0], betas=(beta1, 0.999)),
                torch.optim.SGD(first.parameters(), lr=lrs[2], momentum=0.9)]
    else:                           # Muon on the matrices, AdamW on the biases (Muon's usual setup)
        assert combo == "muon+adamw"
        lrs = lrs or (0.02, 0.01)
        opts = [torch.optim.Muon([first.weight, second.weight], lr=lrs[0], momentum=0.9),
                torch.optim.AdamW([first.bias, second.bias], lr=lrs[1], betas=(beta1, 0.999),
                                  weight_decay=0.01)]
    schedulers: list[Any] = []
    if schedule:                    # a scheduler on the first optimizer only
        schedulers = [torch.optim.lr_scheduler.StepLR(opts[0], step_size=2, gamma=0.5), None]
    return model, opts, schedulers


def real_loop(combo: str, lrs: tuple[float, ...] = (), beta1: float = 0.9,
              schedule: bool = False) -> tuple[nn.Module, list[torch.optim.Optimizer], float]:
    """The user's training loop over the same batches; L^val after it."""
    model, opts, schedulers = build(combo, lrs, beta1, schedule)
    for batch in TRAIN:
        for opt in opts:
            opt.zero_grad()
        loss(model, batch).backward()
        for opt in opts:
            opt.step()
        for s in schedulers:
            if s is not None:
                s.step()
    with torch.no_grad():
        return model, opts, loss(model, VAL).item()


def solver(combo: str, hypers: dict[str, str], schedule: bool = False, **kwargs: Any) -> gimli.GimliSolver:
    model, opts, schedulers = build(combo, schedule=schedule)
    meta = gimli.MetaParams(opts, hypers)
    return gimli.GimliSolver(model, loss, opts, meta, scheduler=schedulers or None, **kwargs)


def _same_state(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        got = ours[key]
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape, key
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=key)
        else:
            assert got == want, key


@pytest.mark.parametrize("combo", ["sgd+adam", "adam+sgd", "muon+adamw"])
def test_unroll_steps_as_the_real_optimizers(combo: str) -> None:
    s = solver(combo, {"lr": "group"})
    s.hypergradient(TRAIN, VAL, commit=True)            # the unroll's end, written back
    real, real_opts, _ = real_loop(combo)
    for p, q in zip(s.problem.module.parameters(), real.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    opts = s.problem.inner.torch_optimizer.optimizers
    for opt, ref in zip(opts, real_opts):               # each optimizer holds its own state
        mine = [p for g in opt.param_groups for p in g["params"]]
        assert set(opt.state) == set(mine)
        for p, q in zip(mine, [q for g in ref.param_groups for q in g["params"]]):
            _same_state(opt.state[p], ref.state[q])


@pytest.mark.parametrize("combo", ["sgd+adam", "adam+sgd"])
def test_hypergradient_is_the_real_loops(combo: str) -> None:
    """lr per group over both optimizers, β₁ (Adam's only): the real loop's central differences."""
    s = solver(combo, {"lr": "group", "beta1": "scalar"})
    got = s.hypergradient(TRAIN, VAL)
    assert got["hypers.lr"].shape == (3,) and got["hypers.beta1"].shape == ()
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(s, TRAIN, VAL))
    lrs = tuple(s.meta.value("lr").tolist())
    h = 1e-6
    for g in range(3):
        up, down = list(lrs), list(lrs)
        up[g] += h
        down[g] -= h
        fd = (real_loop(combo, tuple(up))[2] - real_loop(combo, tuple(down))[2]) / (2 * h)
        assert got["hypers.lr"][g].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
        assert abs(fd) > 1e-6                           # every group's lr matters
    fd = (real_loop(combo, lrs, 0.9 + h)[2] - real_loop(combo, lrs, 0.9 - h)[2]) / (2 * h)
    assert got["hypers.beta1"].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
    assert abs(fd) > 1e-6


def test_muon_and_adamw_against_the_autograd_unroll() -> None:
    """Muon's Newton–Schulz runs in bfloat16 (finite differences cannot see through it):
    the full autograd unroll of the same rules is the reference."""
    s = solver("muon+adamw", {"lr": "group", "weight_decay": "tensor", "beta1": "scalar",
                              "momentum": "scalar"})
    got = s.hypergradient(TRAIN, VAL)
    # weight_decay: Muon's two matrices and AdamW's two biases; momentum: Muon's only
    assert got["hypers.weight_decay"].shape == (4,) and got["hypers.momentum"].shape == ()
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(s, TRAIN, VAL))
    assert all(bool(g.abs().max() > 0) for g in got.values())


@pytest.mark.parametrize("how", ["recompute", "budget", "forward", "first_order"])
def test_every_mode(how: str) -> None:
    """The memory modes and forward mode give reverse mode's hypergradient; first-order
    gives the autograd unroll's first-order one."""
    hypers = {"lr": "tensor", "beta1": "group"}
    reference = solver("sgd+adam", hypers)
    kwargs: dict[str, Any] = {"recompute": {"memory": "recompute"},
                              "budget": {"memory": "budget", "snapshots": 2},
                              "forward": {"mode": "forward"},
                              "first_order": {"first_order": True}}[how]
    s = solver("sgd+adam", hypers, **kwargs)
    want = gimli.full_unroll_hypergradient(s, TRAIN, VAL) if how == "first_order" else \
        reference.hypergradient(TRAIN, VAL)
    assert_hypergradients_close(s.hypergradient(TRAIN, VAL), want)


def test_a_learned_schedule_and_clipping() -> None:
    """lr per group and step (a schedule over the unroll) and β₁ per step, through
    clip_grad_norm_ over both optimizers' tensors: the autograd unroll's."""
    model, opts, _ = build("sgd+adam")
    meta = gimli.MetaParams(opts, {"lr": "group-step", "beta1": "step"}, steps=len(TRAIN))
    s = gimli.GimliSolver(model, loss, opts, meta, clip=gimli.ClipGradNorm(0.5))
    got = s.hypergradient(TRAIN, VAL)
    assert got["hypers.lr"].shape == (len(TRAIN), 3) and got["hypers.beta1"].shape == (len(TRAIN),)
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(s, TRAIN, VAL))
    assert bool((got["hypers.lr"].abs() > 0).all())


def test_granularities_count_the_groups_and_tensors_that_have_the_name() -> None:
    model, opts, _ = build("sgd+adam")
    meta = gimli.MetaParams(opts, {"lr": "element", "beta1": "tensor", "momentum": "group"})
    sizes = [p.numel() for p in model.parameters()]
    assert meta.hyper("lr").shape == (sum(sizes),)
    assert meta.hyper("beta1").shape == (2,)            # Adam's weight and bias
    assert meta.hyper("momentum").shape == (1,)         # SGD's one group
    beta1 = meta.expand("beta1")
    assert beta1[0] is None and beta1[1] is None and beta1[2] is not None   # SGD's tensors: none
    s = gimli.GimliSolver(model, loss, opts, meta)
    assert_hypergradients_close(s.hypergradient(TRAIN, VAL), gimli.full_unroll_hypergradient(s, TRAIN, VAL))


def test_step_writes_each_optimizers_groups() -> None:
    s = solver("sgd+adam", {"lr": "group", "beta1": "scalar"})
    s.meta_opt = torch.optim.SGD(s.meta.parameters(), lr=1e-3)
    s.step(TRAIN, VAL)
    sgd, adam = s.problem.inner.torch_optimizer.optimizers
    lr, beta1 = s.meta.value("lr").detach().tolist(), s.meta.value("beta1").item()
    assert [g["lr"] for g in sgd.param_groups + adam.param_groups] == lr
    assert lr != [0.1, 0.01, 0.02]                      # the meta-step moved them
    assert all(g["betas"] == (beta1, 0.999) for g in adam.param_groups)
    assert "betas" not in sgd.param_groups[0]


def test_schedulers_follow_each_optimizer() -> None:
    """A scheduler on one optimizer (the other has none): the unroll follows it, a commit
    advances it, and the hypergradient of the base lrs is the real loop's."""
    s = solver("sgd+adam", {"lr": "group"}, schedule=True)
    got = s.hypergradient(TRAIN, VAL)
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(s, TRAIN, VAL))
    lrs = (0.1, 0.01, 0.02)
    h = 1e-6
    for g in range(3):
        up, down = list(lrs), list(lrs)
        up[g] += h
        down[g] -= h
        fd = (real_loop("sgd+adam", tuple(up), schedule=True)[2]
              - real_loop("sgd+adam", tuple(down), schedule=True)[2]) / (2 * h)
        assert got["hypers.lr"][g].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
    s.hypergradient(TRAIN, VAL, commit=True)
    real, real_opts, _ = real_loop("sgd+adam", schedule=True)
    sgd = s.problem.inner.torch_optimizer.optimizers[0]
    assert sgd.param_groups[0]["lr"] == pytest.approx(real_opts[0].param_groups[0]["lr"], rel=1e-15)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3, rel=1e-15)
    for p, q in zip(s.problem.module.parameters(), real.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_single_scheduler_is_matched_to_its_optimizer() -> None:
    model, opts, schedulers = build("sgd+adam", schedule=True)
    meta = gimli.MetaParams(opts, {"lr": "group"})
    one = gimli.GimliSolver(model, loss, opts, meta, scheduler=schedulers[0])
    listed = solver("sgd+adam", {"lr": "group"}, schedule=True)
    assert_hypergradients_close(one.hypergradient(TRAIN, VAL), listed.hypergradient(TRAIN, VAL))


def test_step_rebases_the_scheduler_and_resumes_bit_for_bit() -> None:
    def fresh() -> gimli.GimliSolver:
        s = solver("sgd+adam", {"lr": "group", "beta1": "scalar"}, schedule=True)
        s.meta_opt = torch.optim.Adam(s.meta.parameters(), lr=1e-3)
        s._check_meta_opt()
        return s

    a = fresh()
    a.step(TRAIN, VAL, commit=True)
    saved = copy.deepcopy(a.state_dict())
    model_state = copy.deepcopy(a.problem.module.state_dict())
    opt_states = [copy.deepcopy(o.state_dict()) for o in a.problem.inner.torch_optimizer.optimizers]
    sched_state = copy.deepcopy(a.problem.scheduler.schedulers[0].state_dict())
    a.step(TRAIN, VAL, commit=True)

    b = fresh()
    b.problem.module.load_state_dict(model_state)
    for o, st in zip(b.problem.inner.torch_optimizer.optimizers, opt_states):
        o.load_state_dict(st)
    b.problem.scheduler.schedulers[0].load_state_dict(sched_state)
    b.load_state_dict(saved)
    b.step(TRAIN, VAL, commit=True)
    for p, q in zip(a.problem.module.parameters(), b.problem.module.parameters()):
        assert torch.equal(p, q)
    for x, y in zip(a.meta.parameters(), b.meta.parameters()):
        assert torch.equal(x, y)
    sgd = a.problem.inner.torch_optimizer.optimizers[0]
    assert sgd.param_groups[0]["initial_lr"] == a.meta.value("lr")[0].item()    # re-based


def test_a_failed_step_changes_no_optimizer() -> None:
    s = solver("sgd+adam", {"lr": "group"})
    s.meta_opt = torch.optim.SGD(s.meta.parameters(), lr=1e-3)
    s._check_meta_opt()
    s.hypergradient(TRAIN, VAL, commit=True)            # both optimizers hold state
    opts = s.problem.inner.torch_optimizer.optimizers
    before = [copy.deepcopy(o.state_dict()) for o in opts]
    weights = copy.deepcopy(s.problem.module.state_dict())
    bad = [(x, y * math.nan) for x, y in TRAIN]
    with pytest.raises(FloatingPointError):
        s.step(bad, VAL, commit=True)
    for o, saved in zip(opts, before):
        after = o.state_dict()
        assert after["param_groups"] == saved["param_groups"]
        for k, st in saved["state"].items():
            for key, v in st.items():
                assert torch.equal(after["state"][k][key], v)
    for k, v in weights.items():
        assert torch.equal(s.problem.module.state_dict()[k], v)


def test_gimli_check_takes_several_optimizers() -> None:
    s = solver("sgd+adam", {"lr": "group", "beta1": "scalar"})
    report = gimli.check(s, TRAIN[:3], VAL)
    assert report.passed and report.verified, str(report)


def test_refusals() -> None:
    model, opts, _ = build("sgd+adam")
    twice = torch.optim.SGD([model[0].weight], lr=0.1)
    with pytest.raises(ValueError, match="optimizers #0 and #2"):
        gimli.MetaParams(opts + [twice], {"lr": "group"})
    meta = gimli.MetaParams(opts, {"lr": "group"})
    with pytest.raises(ValueError, match="same list in the same order"):
        gimli.GimliSolver(model, loss, opts[::-1], meta)
    with pytest.raises(ValueError, match="2 optimizers"):
        gimli.GimliSolver(model, loss, opts, meta,
                          scheduler=[torch.optim.lr_scheduler.StepLR(opts[0], 2)])
    with pytest.raises(ValueError, match="scheduler #1 of the list drives a different optimizer"):
        gimli.GimliSolver(model, loss, opts, meta,
                          scheduler=[None, torch.optim.lr_scheduler.StepLR(opts[0], 2)])
    with pytest.raises(ValueError, match="has no differentiable hyperparameter 'foo'"):
        gimli.MetaParams(opts, {"foo": "scalar"})
    with pytest.raises(TypeError, match="torch.optim optimizer"):
        gimli.MetaParams([opts[0], "adam"], {"lr": "group"})


def test_a_learned_optimizer_beside_adam() -> None:
    """A learned optimizer's network steps one layer, Adam the other: the network's weights
    are learned with Adam's lrs, and only the learned optimizer's groups read them."""
    model = copy.deepcopy(START)
    learned = gimli.LearnedOptimizer(model[0].parameters())
    learned.param_groups[0]["net"].double()
    adam = torch.optim.Adam(model[2].parameters(), lr=0.01)
    meta = gimli.MetaParams([learned, adam], {"net": "scalar", "lr": "group"})
    s = gimli.GimliSolver(model, loss, [learned, adam], meta)
    got = s.hypergradient(TRAIN, VAL)
    assert got["hypers.lr"].shape == (2,)
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(s, TRAIN, VAL))
    assert all(bool(g.abs().max() > 0) for g in got.values())
