"""User-defined and learned optimizers: forward parity with their own torch.optim
step, and hypergradients equal to the full autograd unroll, with the VJP from
autograd on the single step or from the user's closed form.

Oracles: the user's own ``torch.optim.Optimizer.step``; the full autograd unroll;
the autograd-on-one-step VJP for the user's closed form.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import gimli
from gimli.optim import LearnedOptimizer, bind
from gimli.optim.learned import default_net
from strategies import GRANULARITIES, mlp, mse, regression_batches
from test_sweep import assert_hypergradients_close


class HeavyBall(torch.optim.Optimizer):
    """A user's optimizer: v ← (1 − friction)·v + g; θ ← θ − lr·v."""

    def __init__(self, params: Any, lr: float = 0.1, friction: float = 0.1):
        super().__init__(params, dict(lr=lr, friction=friction))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("velocity", torch.zeros_like(p))
                v.mul_(1 - group["friction"]).add_(p.grad)
                p.sub_(group["lr"] * v)


def init(param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    return {"velocity": torch.zeros_like(param)}


def step(param: Tensor, state: dict[str, Tensor], grad: Tensor,
         hp: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    v = (1 - hp["friction"]) * state["velocity"] + grad
    return param - hp["lr"] * v, {"velocity": v}


def vjp(param: Tensor, state: dict[str, Tensor], grad: Tensor, hp: dict[str, Tensor],
        cot_param: Tensor, cot_state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
    v = (1 - hp["friction"]) * state["velocity"] + grad
    v_bar = cot_state["velocity"] - hp["lr"] * cot_param           # v feeds θ' and is state
    return (cot_param, {"velocity": (1 - hp["friction"]) * v_bar}, v_bar,
            {"lr": -cot_param * v, "friction": -v_bar * state["velocity"]})


class HeavyBallClosedForm(HeavyBall):
    """The same optimizer, registered with its closed-form VJP."""


gimli.register_optimizer(HeavyBall, hypers=("lr", "friction"), init=init, step=step)
gimli.register_optimizer(HeavyBallClosedForm, hypers=("lr", "friction"), init=init, step=step, vjp=vjp)


def setup(cls: type, seed: int, per: dict[str, str], pre_steps: int = 1) -> tuple[Any, ...]:
    torch.manual_seed(seed)
    model = mlp([2, 4, 1], "tanh")
    params = list(model.parameters())
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1, friction=0.2)
    batches = regression_batches(seed, 2, 1, 6)
    for batch in batches[:pre_steps]:           # an optimizer that has already stepped
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    meta = gimli.MetaParams(opt, per, init=model)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    return model, opt, solver, batches[pre_steps:pre_steps + 4], batches[-1]


def test_custom_forward_parity() -> None:
    model, opt, _, train, _ = setup(HeavyBall, 0, {})
    inner = bind(opt)
    theta, state, hp = [p.detach().clone() for p in inner.params], inner.read_state(), inner.constant_hypers()
    for batch in train:
        grads = torch.autograd.grad(mse(model, batch), list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        theta, state = inner.step(theta, state, list(grads), hp)
        opt.step()
        model.zero_grad()
        # our θ follows the real optimizer's: both take the gradient at the real θ
        for i, p in enumerate(inner.params):
            torch.testing.assert_close(theta[i], p.detach(), rtol=1e-12, atol=0.0)
            torch.testing.assert_close(state.velocity[i], opt.state[p]["velocity"], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("cls", [HeavyBall, HeavyBallClosedForm], ids=["autograd-vjp", "closed-form-vjp"])
@given(seed=st.integers(0, 2**16), lr=st.sampled_from(GRANULARITIES[1:]),
       friction=st.sampled_from(GRANULARITIES))
def test_custom_hypergradient_matches_oracle(cls: type, seed: int, lr: str, friction: str) -> None:
    _, _, solver, train, val = setup(cls, seed, {"lr": lr, "friction": friction})
    assert_hypergradients_close(solver.hypergradient(train, val),
                                gimli.full_unroll_hypergradient(solver, train, val))


def test_closed_form_equals_autograd_fallback() -> None:
    per = {"lr": "element", "friction": "tensor"}
    _, _, a, train, val = setup(HeavyBall, 3, per)
    _, _, b, _, _ = setup(HeavyBallClosedForm, 3, per)
    assert_hypergradients_close(b.hypergradient(train, val), a.hypergradient(train, val))


# --- the learned optimizer ---------------------------------------------------------------

def learned_setup(seed: int) -> tuple[Any, ...]:
    torch.manual_seed(seed)
    model = mlp([2, 4, 1], "tanh")
    opt = LearnedOptimizer(model.parameters(), default_net(hidden=6).double(), lr=0.05)
    meta = gimli.MetaParams(opt, {"net": "scalar", "lr": "scalar", "beta": "scalar"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-2))
    batches = regression_batches(seed, 2, 1, 6)
    return model, opt, meta, solver, batches[:5], batches[5]


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_optimizer_hypergradient_matches_oracle(seed: int) -> None:
    model, opt, meta, solver, train, val = learned_setup(seed)
    got = solver.hypergradient(train, val)
    assert {n for n in got if n.startswith("hypers.net.")} == \
        {f"hypers.net.{n}" for n, _ in opt.param_groups[0]["net"].named_parameters()}
    assert_hypergradients_close(got, gimli.full_unroll_hypergradient(solver, train, val))


def test_learned_optimizer_is_meta_trained() -> None:
    """Meta-training the network lowers the validation loss after J steps of the
    learned optimizer, measured by running the optimizer itself on a copy."""
    model, opt, meta, solver, train, val = learned_setup(0)

    def val_after_training() -> float:
        m, o = copy.deepcopy((model, opt))
        for batch in train:
            o.zero_grad()
            mse(m, batch).backward()
            o.step()
        return mse(m, val).item()

    before = val_after_training()
    net_before = copy.deepcopy(opt.param_groups[0]["net"])
    for _ in range(30):
        solver.step(train, val)
    after = val_after_training()
    assert after < 0.9 * before
    # the user's optimizer object now holds the meta-learned network itself
    assert any(not torch.equal(p, q) for p, q in zip(opt.param_groups[0]["net"].parameters(),
                                                      net_before.parameters()))


class HeavyBallRanged(HeavyBall):
    """The same optimizer, registered with the values it accepts."""


gimli.register_optimizer(HeavyBallRanged, hypers=("lr", "friction"), init=init, step=step,
                         ranges={"lr": (0.0, math.inf),
                                 "friction": gimli.optim.Interval(0.0, 1.0, hi_open=True)})


def test_registered_ranges_keep_learned_values_inside() -> None:
    """A meta-step that would push lr below 0 and friction to 1 or beyond projects them
    into the registered ranges (what is written into the param groups too); 'logit'
    fits friction's range, 'log' does not fit an unregistered name's whole line."""
    model, opt, solver, train, val = setup(HeavyBallRanged, 0, {"lr": "group", "friction": "scalar"})
    meta = solver.meta
    with torch.no_grad():
        meta.hyper("lr").fill_(-0.5)
        meta.hyper("friction").fill_(1.5)
    meta.constrain_()
    assert meta.hyper("lr").min() >= 0 and 0 <= float(meta.hyper("friction").detach()) < 1
    meta.write_back()
    assert all(g["lr"] >= 0 and 0 <= g["friction"] < 1 for g in opt.param_groups)
    gimli.MetaParams(opt, {"friction": "scalar"}, transform={"friction": "logit"})
    with pytest.raises(ValueError, match="friction"):
        gimli.MetaParams(opt, {"friction": "scalar"}, transform={"friction": "log"})
    with pytest.raises(ValueError, match="not among hypers"):
        gimli.register_optimizer(HeavyBallRanged, hypers=("lr",), init=init, step=step,
                                 ranges={"momentum": (0.0, 1.0)})
