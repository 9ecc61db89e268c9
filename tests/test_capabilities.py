"""Every hyperparameter at every granularity that the guide's table claims has a
hypergradient equal to the full autograd unroll's (float64, rtol 1e-9).

The property tests draw random subsets; this one walks the whole table
(``gimli.optim.capabilities()``, the guide table's source) on one small
problem per optimizer at its typical settings (``gimli/optim/_settings.py``), so no
claimed combination is left to chance. And every optimizer has its rows in the tables
that drive the tests and ``gimli check``: a missing one fails, it skips nothing.
"""

from __future__ import annotations

import pytest
import torch

import gimli
import gimli._check as check
from gimli.optim import BUILTIN, SUPPORTED, capabilities
from gimli.optim._settings import TYPICAL
from optim_db import OPTIM_DB
from setups import optimizer_class
from strategies import Problem, mlp, mse, regression_batches, take_real_steps
from test_sweep import assert_hypergradients_close

# real steps first: RAdam's rectification (ρ_t > 5) is on in the unroll; but none for
# Rprop, whose lr only sets the step size of a fresh optimizer
PRE = {"RAdam": 5, "Rprop": 0}
STEPS = {"Rprop": 8}    # time for two sign flips in a row, so the lower step-size bound binds
# every optimizer claimed, with or without typical settings (one without fails below)
CASES = [(opt, hyper, grans) for opt, hypers in capabilities().items() for hyper, grans in hypers.items()]
# optimizers whose random settings are drawn elsewhere than tests/optim_db.py: the reason
NOT_IN_OPTIM_DB = {"LearnedOptimizer": "not a torch.optim class (no torch step to match); "
                                       "tests/test_custom.py draws its settings"}


def test_every_optimizer_has_its_rows() -> None:
    """Every built-in optimizer this torch has (and LearnedOptimizer) has a rule, a row of
    typical settings, a row of random settings (tests/optim_db.py) and a row in the
    ``gimli check`` zoo; and no table holds a row of an optimizer gimli does not know."""
    here = [name for name in BUILTIN if hasattr(torch.optim, name)] + ["LearnedOptimizer"]
    known = set(BUILTIN) | {"LearnedOptimizer"}
    classes = {cls.__name__ for cls in SUPPORTED}
    assert [n for n in here if n not in classes] == [], "no rule (gimli/optim/<file>.py)"
    assert [n for n in here if n not in TYPICAL] == [], "no row in gimli/optim/_settings.py"
    assert sorted(set(TYPICAL) - known) == []
    db = [row.name for row in OPTIM_DB]
    assert [n for n in here if n not in db and n not in NOT_IN_OPTIM_DB] == [], \
        "no row in tests/optim_db.py"
    assert sorted(set(db) - known) == [] and len(db) == len(set(db))
    zoo = {row.split()[0] for row in check.ZOO}
    assert [n for n in here if n not in zoo] == [], "not in the gimli check zoo"
    assert sorted(set(check.CHANGES) - set(check.ZOO)) == [], "zoo variants of no optimizer"
    assert [n for n in capabilities() if n not in TYPICAL] == []


@pytest.mark.parametrize("opt_name,hyper,granularities", CASES,
                         ids=[f"{o}-{h}" for o, h, _ in CASES])
def test_every_claimed_granularity(opt_name: str, hyper: str, granularities: tuple[str, ...]) -> None:
    cls = optimizer_class(opt_name)
    matrices = opt_name == "Muon"
    pre = PRE.get(opt_name, 2)
    for per in granularities:
        torch.manual_seed(0)
        model = mlp([3, 4, 2], "tanh", bias=not matrices)
        params = list(model.parameters())
        half = len(params) // 2
        second_lr = TYPICAL[opt_name]["lr"] * (1.0 if per == "scalar" else 0.5)
        opt = cls([{"params": params[:half]}, {"params": params[half:], "lr": second_lr}],
                  **TYPICAL[opt_name])
        steps = STEPS.get(opt_name, 4)
        batches = regression_batches(1, 3, 2, pre + steps + 1)
        take_real_steps(Problem(model, opt, batches[:pre], batches[-1]), pre)
        meta = gimli.MetaParams(opt, {hyper: per})
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
        batches = batches[pre:]
        ref = gimli.full_unroll_hypergradient(solver, batches[:steps], batches[steps])
        claimed = [g for name, g in ref.items() if name == f"hypers.{hyper}"
                   or name.startswith(f"hypers.{hyper}.")]      # a module's, one per tensor
        assert any(g.abs().sum() > 0 for g in claimed), "a claim that this problem cannot test"
        assert_hypergradients_close(solver.hypergradient(batches[:steps], batches[steps]), ref)
