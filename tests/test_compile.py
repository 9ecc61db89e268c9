"""``GimliSolver(compile=True)``: the rule's step and VJP run through ``torch.compile``
and give the eager hypergradient. Oracle: the same solver without compile, and the full
autograd unroll (which steps eagerly: nothing is differentiated through compiled code).

Few tests: each rule's first compile in a process takes seconds on a CPU."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gimli
from gimli.optim._settings import TYPICAL
from strategies import regression_batches


def _mse(model: Any, batch: Any, meta: gimli.MetaParams) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _solver(model: nn.Module, opt: torch.optim.Optimizer, learned: dict[str, str],
            compile: bool) -> gimli.GimliSolver:
    """The solver of the mean squared error on ``model``, ``learned`` meta-learned."""
    return gimli.GimliSolver(model, _mse, opt, gimli.MetaParams(opt, learned), compile=compile)


def solver_for(model: nn.Module, compile: bool) -> gimli.GimliSolver:
    model = copy.deepcopy(model)
    opt = torch.optim.Adam([{"params": model[0].parameters()},
                            {"params": model[2].parameters(), "lr": 0.02}], lr=0.01, weight_decay=0.01)
    return _solver(model, opt, {"lr": "tensor", "beta1": "scalar"}, compile)


def _mlp_and_data(seed: int, J: int) -> tuple[nn.Module, list[Any], Any]:
    """A float64 3-8-1 tanh MLP and J training batches with a validation batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    batches = regression_batches(seed, 3, 1, J + 1)
    return model, batches[:J], batches[J]


def _agree(eager: dict[str, torch.Tensor], compiled: dict[str, torch.Tensor],
           oracle: dict[str, torch.Tensor]) -> None:
    """compiled within 1e-9 of eager, and of the autograd unroll, relative to eager's size."""
    assert eager.keys() == compiled.keys() == oracle.keys()
    for key in eager:
        scale = eager[key].abs().max()
        assert scale > 0, key
        assert (compiled[key] - eager[key]).abs().max() <= 1e-9 * scale, key
        assert (oracle[key] - compiled[key]).abs().max() <= 1e-9 * scale, key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch's own, importing inductor
def test_compiled_hypergradient_equals_eager() -> None:
    model, train, val = _mlp_and_data(0, 4)
    eager = solver_for(model, False).hypergradient(train, val)
    compiled_solver = solver_for(model, True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = compiled_solver.hypergradient(train, val)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2   # step and VJP ran compiled
    _agree(eager, compiled, gimli.full_unroll_hypergradient(compiled_solver, train, val))


# The flat path's pieces each of these exercises under the compiler: a state buffer the
# first step creates (SGD's momentum), one number per tensor carried in the state and its
# cotangent placed back (NAdam's mu_product), a state entry the step creates per tensor
# (ASGD's eta).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["SGD", "NAdam", "ASGD"])
def test_compiled_rule_equals_eager_and_the_unroll(name: str) -> None:
    model, train, val = _mlp_and_data(1, 4)

    def make(compile: bool) -> gimli.GimliSolver:
        m = copy.deepcopy(model)
        opt = getattr(torch.optim, name)([{"params": m[0].parameters()}, {"params": m[2].parameters()}],
                                         **TYPICAL[name])
        return _solver(m, opt, {"lr": "tensor"}, compile)

    eager = make(False).hypergradient(train, val)
    compiled_solver = make(True)
    compiled = compiled_solver.hypergradient(train, val)
    _agree(eager, compiled, gimli.full_unroll_hypergradient(compiled_solver, train, val))


# Each rule's numbers that depend on the step count t alone, written out from torch.optim's
# documented updates (betas (0.8, 0.95), NAdam's momentum_decay ψ = 0.004), for t = 1, 2, ...
def _adam(t: int) -> dict[str, float]:
    return {"c1": 1 - 0.8 ** t, "c2": 1 - 0.95 ** t}


def _nadam(t: int) -> dict[str, float]:
    return {"e": 0.96 ** (t * 0.004), "e_next": 0.96 ** ((t + 1) * 0.004), "c2": 1 - 0.95 ** t}


def _radam(t: int) -> dict[str, float]:
    rho_inf = 2 / (1 - 0.95) - 1
    return {"c1": 1 - 0.8 ** t, "c2": 1 - 0.95 ** t, "rho_inf": rho_inf,
            "rho_t": rho_inf - 2 * t * 0.95 ** t / (1 - 0.95 ** t)}


def _adamax(t: int) -> dict[str, float]:
    return {"c1": 1 - 0.8 ** t}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name, expected, learned", [
    ("Adam", _adam, ("lr",)),
    ("Adam", _adam, ("lr", "beta1", "beta2")),
    ("NAdam", _nadam, ("lr", "beta2", "momentum_decay")),
    ("RAdam", _radam, ("lr", "beta1", "beta2")),
    ("Adamax", _adamax, ("lr", "beta1")),
])
def test_a_compiled_call_is_handed_its_step_count_numbers(name: str, expected: Any, learned: tuple[str, ...],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled call of a rule whose update reads numbers of the step count t (bias
    corrections 1 − β^t, NAdam's 0.96^(tψ), RAdam's ρ_t) gets them formed before it
    (``Rule.scalars``), once for each step and once for each VJP, each equal to torch.optim's
    formula; and the hypergradient (of the lrs, and of the β's and ψ where learned, so that
    those numbers are tensors with cotangents) is the eager one and the unroll's. J = 7
    steps, so that RAdam runs both its branches (ρ_t ≤ 5 up to t = 5, > 5 after)."""
    from gimli.optim import SUPPORTED
    J = 7
    optimizer = getattr(torch.optim, name)
    rule = SUPPORTED[optimizer]
    assert rule.scalars is not None
    formed: list[tuple[int, dict[str, float]]] = []

    def scalars(s: Any, hp: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = rule.scalars(s, hp)
        formed.append((s.step + 1, {k: float(v.reshape(-1)[0]) for k, v in out.items()}))
        return out

    monkeypatch.setitem(SUPPORTED, optimizer, dataclasses.replace(rule, scalars=scalars))
    model, train, val = _mlp_and_data(2, J)

    def make(compile: bool) -> gimli.GimliSolver:
        m = copy.deepcopy(model)
        extra = {"momentum_decay": 0.004} if name == "NAdam" else {}
        opt = optimizer(m.parameters(), lr=0.01, betas=(0.8, 0.95), **extra)
        return _solver(m, opt, {n: "tensor" if n == "lr" else "scalar" for n in learned}, compile)

    eager = make(False).hypergradient(train, val)
    assert formed == []                                     # eager: the rule forms them itself
    compiled_solver = make(True)
    compiled = compiled_solver.hypergradient(train, val)
    assert sorted(t for t, _ in formed) == sorted(list(range(1, J + 1)) * 2)     # J steps, J VJPs
    for t, values in formed:
        want = expected(t)
        assert values.keys() == want.keys()
        assert all(abs(values[k] - want[k]) <= 1e-12 * max(1.0, abs(want[k])) for k in want), (t, values, want)
    if name == "RAdam":
        assert min(v["rho_t"] for _, v in formed) <= 5 < max(v["rho_t"] for _, v in formed)
    assert eager.keys() == {f"hypers.{n}" for n in learned}
    _agree(eager, compiled, gimli.full_unroll_hypergradient(compiled_solver, train, val))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_compiled_call_forms_its_corrections_as_its_kernel_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 model: the compiled Adam call gets c₁ = 1 − β₁^t and c₂ = 1 − β₂^t formed in
    double precision from the float32 β₁, β₂ its body reads, and rounded once; so c₂ agrees
    with the body's own 1 − β₂ (0.999 is 0.99900001 in float32: c₂ formed from the exact
    0.999, or in float32, is 10⁻⁵ off it). And the compiled float32 hypergradient is as
    near the float64 one as the eager float32 one is (within 2 × its distance)."""
    from gimli.optim import _rule
    J = 6
    handed: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = _rule.compiled

    def recording(body: Any, rule: Any) -> Any:
        run = original(body, rule)

        def call(flags: Any, p: Any, st: Any, g: Any, hps: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            handed.append((st.step + 1, hps["c1"], hps["c2"]))
            return run(flags, p, st, g, hps, *args, **kwargs)
        return call

    monkeypatch.setattr(_rule, "compiled", recording)
    model, train, val = _mlp_and_data(3, J)

    def hypergradient(dtype: torch.dtype, compile: bool) -> torch.Tensor:
        m = copy.deepcopy(model).to(dtype)
        opt = torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.9, 0.999))
        as_dtype = [(x.to(dtype), y.to(dtype)) for x, y in train + [val]]
        return _solver(m, opt, {"lr": "tensor"}, compile).hypergradient(as_dtype[:J], as_dtype[J])["hypers.lr"].double()

    truth, eager = hypergradient(torch.float64, False), hypergradient(torch.float32, False)
    assert handed == []
    compiled = hypergradient(torch.float32, True)
    assert sorted(t for t, _, _ in handed) == sorted(list(range(1, J + 1)) * 2)     # J steps, J VJPs
    b1, b2 = (float(torch.tensor(b, dtype=torch.float32)) for b in (0.9, 0.999))   # as float32 holds them
    for t, c1, c2 in handed:
        assert c1.dtype == c2.dtype == torch.float32 and c1.dim() == c2.dim() == 0
        assert c1.item() == torch.tensor(1 - b1 ** t, dtype=torch.float32).item()
        assert c2.item() == torch.tensor(1 - b2 ** t, dtype=torch.float32).item()
    scale = truth.abs().max()
    assert (compiled - truth).abs().max() <= 2 * (eager - truth).abs().max() + 1e-7 * scale
