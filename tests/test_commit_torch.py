"""After a commit the user's own optimizer steps as torch.optim would (gimli/_transaction.py's
commit, each rule's write_state, InnerOptimizer.check_commit).

For every optimizer of the table (tests/optim_db.py) and every granularity, learning every
hyperparameter offered there: ``solver.step(commit=True)`` (or ``hypergradient(...,
commit=True)``), then one ``opt.step()`` of the user's optimizer, must give the parameters
and state (values, dtypes, shapes) of the real torch.optim run of those J steps followed
by that one more step, with the hyperparameters the user's param groups then hold. Or,
where torch.optim cannot hold the state the unroll ends in, commit=True is refused up
front with the reason, and nothing changes.

The model is float64 under the default float32 dtype: torch.optim then keeps its 0-dim
state (NAdam's mu_product, ASGD's eta and mu, the step counts) in float32, not in the
parameters' dtype.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import gimli
from gimli.optim import capabilities
from optim_db import OPTIM_DB
from strategies import mse, regression_batches
from setups import SETTINGS, setup

GRANULARITIES = ("scalar", "group", "tensor", "element")
# torch.optim keeps these as one 0-dim tensor per parameter and reads them with .item()
# (NAdam: mu_product = Π μ_t, with μ_t from β₁ and ψ; ASGD: eta from lr, λ, α): a
# hyperparameter learned per element makes them one per element. Read from torch's source,
# independently of the rules' SCALAR_STATE.
PER_TENSOR_STATE = {"NAdam": {"beta1", "momentum_decay"}, "ASGD": {"lr", "lambd", "alpha"}}
NAMES = [row.name for row in OPTIM_DB] + ["LearnedOptimizer"]
CASES = [(name, per, call) for name in NAMES for per in GRANULARITIES
         for call in ("step", "hypergradient")]


def _hypers(name: str, per: str) -> dict[str, str]:
    return {h: per for h, offered in capabilities()[name].items() if per in offered}


def _grad_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any) -> None:
    opt.zero_grad()
    mse(model, batch).backward()
    opt.step()


def _assert_same(model: torch.nn.Module, opt: torch.optim.Optimizer, ref_model: torch.nn.Module,
                 ref_opt: torch.optim.Optimizer) -> None:
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        ours, theirs = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert ours.keys() == theirs.keys(), n
        for key, want in theirs.items():
            got = ours[key]
            if not isinstance(want, torch.Tensor):
                assert got == want, (n, key)
                continue
            assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device), \
                (n, key, got.dtype, want.dtype, got.shape, want.shape)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{n} {key}")


@pytest.mark.parametrize("name,per,call", CASES, ids=["-".join(c) for c in CASES])
def test_committed_optimizer_steps_as_torch(name: str, per: str, call: str) -> None:
    hypers = _hypers(name, per)
    if not hypers:
        pytest.skip(f"{name} offers nothing per {per}")
    settings = dict(SETTINGS[name])
    if name == "SGD":
        settings["dampening"] = 0.1             # learnable (not under Nesterov)
    model, opt = setup(name, per, settings)
    pre = 0 if name == "Rprop" else 2           # Rprop: its lr sets the first step size
    batches = regression_batches(7, 3, 2, pre + 5)
    for batch in batches[:pre]:                 # real steps first: a state to continue from
        _grad_step(model, opt, batch)
    train, val, last = batches[pre:pre + 3], batches[pre + 3], batches[pre + 4]
    ref_model, ref_opt = copy.deepcopy((model, opt))

    meta = gimli.MetaParams(opt, hypers)
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta,
                               meta_opt=torch.optim.Adam(meta.parameters(), lr=1e-4))
    refused = per == "element" and bool(PER_TENSOR_STATE.get(name, set()) & set(hypers))
    if refused:
        before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        with pytest.raises(ValueError, match="commit=True cannot .* one number per tensor.*"
                                             "per 'tensor', 'group' or 'scalar'"):
            if call == "step":
                solver.step(train, val, commit=True)
            else:
                solver.hypergradient(train, val, commit=True)
        after = (model.state_dict(), opt.state_dict())
        torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
        assert repr(after[1]) == repr(before[1])
        solver.hypergradient(train, val)        # without commit it is fine
        return

    if call == "step":
        solver.step(train, val, commit=True)
    else:
        solver.hypergradient(train, val, commit=True)
    # the reference: J steps of the real optimizer with the hyperparameters the unroll used
    # (the meta-parameters' values before the meta-update: the optimizer's own), then the
    # hyperparameters the user's param groups hold now, then one more step on both
    for batch in train:
        _grad_step(ref_model, ref_opt, batch)
    for group, ref_group in zip(opt.param_groups, ref_opt.param_groups):
        for key, value in group.items():
            if isinstance(value, torch.nn.Module):      # a learned optimizer's network
                ref_group[key].load_state_dict(value.state_dict())
            elif key != "params":
                ref_group[key] = copy.deepcopy(value)
    _assert_same(model, opt, ref_model, ref_opt)
    _grad_step(model, opt, last)                # the user's own optimizer, after the commit
    _grad_step(ref_model, ref_opt, last)
    _assert_same(model, opt, ref_model, ref_opt)
