"""Learned hyperparameters stay where torch.optim accepts them (gimli/_meta.py, each rule's
RANGES): the ranges are those of the constructors, a meta-update never writes a value a
constructor would refuse, and log/logit parameterisations have exact hypergradients.

Oracles: the real ``torch.optim`` constructors (does it accept the value?) and steps; the
full autograd unroll through the transform; the chain rule applied to the hypergradient
of the untransformed ("project") hyperparameter; finite differences of the real
``torch.optim`` unroll in the meta-parameter z.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import pytest
import torch
from torch import nn

import gimli
from gimli._meta import valid_range
from gimli.optim import BUILTIN, SUPPORTED, bind, capabilities
from gimli.optim._core import POSITIVE, REAL, Interval
from setups import SETTINGS, optimizer_class, setup
from strategies import mlp, mse, regression_batches
from test_capabilities import PRE, STEPS
from test_sweep import assert_hypergradients_close

GRANULARITIES = ("scalar", "group", "tensor", "element")


def batches_after_real_steps(name: str, model: nn.Module, opt: torch.optim.Optimizer,
                             seed: int) -> tuple[list[Any], Any]:
    """As test_capabilities: a few real steps first (RAdam's rectification on), then the J
    training batches (more for Rprop, to flip signs) and a validation batch."""
    pre, steps = PRE.get(name, 2), STEPS.get(name, 3)
    batches = regression_batches(seed, 3, 2, pre + steps + 1)
    for batch in batches[:pre]:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return batches[pre:pre + steps], batches[-1]


def kwargs_with(cls_name: str, base: dict[str, Any], hyper: str, value: float) -> dict[str, Any]:
    """Constructor arguments with hyperparameter ``hyper`` set to ``value`` (into its tuple
    where the optimizer keeps it in one: Adam's betas, Rprop's etas, ...)."""
    key, index = SUPPORTED[type(setup(cls_name, "group")[1])].group_key(hyper)
    out = dict(base)
    if index is None:
        out[key] = value
    else:
        entry = list(out.get(key, setup(cls_name, "group")[1].defaults[key]))
        entry[index] = value
        out[key] = tuple(entry)
    return out


def accepted(name: str, kwargs: dict[str, Any]) -> bool:
    """Whether the real constructor accepts these arguments."""
    param = torch.zeros(2, 2, requires_grad=True)
    try:
        optimizer_class(name)([param], **kwargs)
    except ValueError:
        return False
    return True


def probes(interval: Interval) -> list[float]:
    """Values on both sides of each finite end, and a spread of ordinary ones."""
    out = [-1e3, -1.0, -0.5, 0.0, 1e-3, 0.5, 1.0, 2.0, 1e3]
    for end in (interval.lo, interval.hi):
        if math.isfinite(end):
            out += [end, math.nextafter(end, -math.inf), math.nextafter(end, math.inf)]
    return sorted(set(out))


ALL = [(opt, hyper) for opt, hypers in capabilities().items() for hyper in hypers if hyper != "net"]


def test_every_rule_declares_every_range() -> None:
    """One table, nothing skipped silently: each builtin rule gives a range for each of its
    hyperparameters."""
    for cls, rule in SUPPORTED.items():
        if cls.__name__ in BUILTIN or cls is gimli.LearnedOptimizer:
            assert set(rule.ranges) == set(rule.hypers), cls.__name__


# where gimli is stricter than the constructor, and the value it excludes that breaks
# torch.optim's own step
NARROWER = {("ASGD", "lambd"): -1e3}


@pytest.mark.parametrize("opt_name,hyper", ALL, ids=[f"{o}-{h}" for o, h in ALL])
def test_ranges_are_the_constructors(opt_name: str, hyper: str) -> None:
    """RANGES[hyper] holds exactly the values the torch.optim constructor accepts (probed on
    both sides of every finite end), with every other argument at a typical setting."""
    interval = SUPPORTED[type(setup(opt_name, "group")[1])].ranges[hyper]
    for value in probes(interval):
        kwargs = kwargs_with(opt_name, SETTINGS[opt_name], hyper, value)
        if (opt_name, hyper) in NARROWER:
            assert accepted(opt_name, kwargs) or value not in interval, (hyper, value)
        else:
            assert accepted(opt_name, kwargs) == (value in interval), (hyper, value, str(interval))


def test_asgd_negative_lambd_breaks_torch_itself() -> None:
    """ASGD's constructor takes any λ, but with λ < 0 its own step computes η = γ/D^α of a
    negative D: a complex number (torch warns that it drops the imaginary part)."""
    value = NARROWER[("ASGD", "lambd")]
    assert accepted("ASGD", {"lr": 0.02, "lambd": value})
    assert value not in SUPPORTED[torch.optim.ASGD].ranges["lambd"]
    param = nn.Parameter(torch.ones(2))
    opt = torch.optim.ASGD([param], lr=0.02, lambd=value)
    param.grad = torch.ones(2)
    with pytest.warns(UserWarning, match="complex"):
        opt.step()


def test_nesterov_cross_condition_is_the_constructors() -> None:
    """SGD with Nesterov: torch requires momentum > 0 and dampening = 0. The learned momentum's
    range there is (0, ∞), and dampening cannot be meta-learned at all."""
    base = dict(lr=0.1, momentum=0.9, nesterov=True)
    model, opt = setup("SGD", "scalar", base)
    meta = gimli.MetaParams(opt, {"momentum": "scalar"})
    for value in probes(meta.ranges["momentum"]):
        assert accepted("SGD", {**base, "momentum": value}) == (value in meta.ranges["momentum"]), value
    assert meta.ranges["momentum"] == POSITIVE
    assert not accepted("SGD", {**base, "dampening": 0.1})
    for per in GRANULARITIES:
        with pytest.raises(ValueError, match="dampening cannot be meta-learned.*nesterov=True"):
            gimli.MetaParams(opt, {"dampening": per})


@pytest.mark.parametrize("opt_name", ["SGD", "RMSprop"])
def test_momentum_built_nonzero_stays_positive(opt_name: str) -> None:
    """A momentum pushed towards 0 stays > 0, so torch.optim keeps its momentum buffer."""
    model, opt = setup(opt_name, "scalar")
    meta = gimli.MetaParams(opt, {"momentum": "scalar"})
    assert meta.ranges["momentum"] == POSITIVE
    with torch.no_grad():
        meta.hyper("momentum").fill_(-5.0)
    meta.constrain_()
    meta.write_back()
    assert all(g["momentum"] > 0 for g in opt.param_groups)
    batches = regression_batches(1, 3, 2, 1)
    opt.zero_grad()
    mse(model, batches[0]).backward()
    opt.step()
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def _cases() -> list[tuple[str, str, str]]:
    return [(opt, hyper, per) for opt, hyper in ALL for per in capabilities()[opt][hyper]]


@pytest.mark.parametrize("opt_name,hyper,per", _cases(), ids=["-".join(c) for c in _cases()])
def test_a_meta_step_never_leaves_the_range(opt_name: str, hyper: str, per: str) -> None:
    """The issue's case, everywhere: a meta-step that throws the hyperparameter far out of
    its range (Rprop's first step is ±1000 per element, by the hypergradient's sign), in
    either direction. Afterwards every param group is accepted by the real constructor and
    steps with the real optimizer, the constructor accepts every value the unroll uses (per
    tensor and per element too, which are not written back), and those are in the range."""
    moved = False
    for maximize in (False, True):
        model, opt = setup(opt_name, per)
        train, val = batches_after_real_steps(opt_name, model, opt, seed=2)
        meta = gimli.MetaParams(opt, {hyper: per})
        start = meta.hyper(hyper).detach().clone()
        meta_opt = torch.optim.Rprop(meta.parameters(), lr=1e3, maximize=maximize)
        solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, meta_opt=meta_opt)
        solver.step(train, val)
        moved |= not torch.equal(meta.hyper(hyper).detach(), start)
        takes = inspect.signature(type(opt).__init__).parameters     # (AdamW: no decoupled_…)
        for group in opt.param_groups:
            settings = {k: v for k, v in group.items() if k in takes and k not in ("params", "net")}
            assert accepted(opt_name, settings), settings
        opt.zero_grad()
        mse(model, val).backward()
        opt.step()                                  # the user's optimizer still steps
        values = sorted(set(torch.cat([v.reshape(-1) for v in meta.hyper_values(hyper)]).tolist()))
        for v in values:
            assert accepted(opt_name, kwargs_with(opt_name, SETTINGS[opt_name], hyper, v)), (hyper, v)
        assert all(v in meta.ranges[hyper] for v in values), (values, str(meta.ranges[hyper]))
    assert moved, "the hypergradient was 0: this case tests nothing"


def test_beta2_at_one_is_refused_and_training_goes_on() -> None:
    """The reported case: one meta-step with {"beta2": "scalar"} used to write betas =
    (0.9, 1.0) and leave every later unroll NaN. β₂ is now the float32 number just below 1
    and the next unroll is finite."""
    torch.manual_seed(0)
    model = mlp([3, 4, 2], "tanh").float()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999))
    meta = gimli.MetaParams(opt, {"beta2": "scalar"})
    batches = [(x.float(), y.float()) for x, y in regression_batches(3, 3, 2, 4)]
    grad = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta) \
        .hypergradient(batches[:3], batches[3])["hypers.beta2"]
    assert grad != 0
    # Rprop's first step: β₂ ← β₂ ∓ 1 by the hypergradient's sign, up to 1.999 before the fix
    meta_opt = torch.optim.Rprop(meta.parameters(), lr=1.0, maximize=bool(grad > 0))
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, meta_opt=meta_opt)
    solver.step(batches[:3], batches[3])
    below_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))     # 1 − 2⁻²⁴
    assert opt.param_groups[0]["betas"] == (0.9, below_one)
    assert accepted("Adam", {"betas": opt.param_groups[0]["betas"]})
    result = solver.step(batches[:3], batches[3], on_nonfinite="skip")
    assert not result.skipped and math.isfinite(result.val_loss)


# --- log and logit ------------------------------------------------------------------------
LOG = Interval(0.0, lo_open=True)
LOGIT = Interval(0.0, 1.0, lo_open=True, hi_open=True)


# typical settings at 0 (no weight decay, no dampening) that log and logit cannot start from
STARTS = {"weight_decay": 0.01, "dampening": 0.1, "lr_decay": 0.1, "momentum_decay": 4e-3,
          "beta1": 0.8, "beta2": 0.9, "step_size_min": 0.004, "step_size_max": 0.011}


def _start_settings(opt_name: str, hyper: str) -> dict[str, Any]:
    kwargs = dict(SETTINGS[opt_name])
    value = STARTS.get(hyper)
    if value is not None:
        kwargs = kwargs_with(opt_name, kwargs, hyper, value)
    return kwargs


def _transform_cases() -> list[tuple[str, str, str, str]]:
    """Each hyperparameter × each transform its range admits (and its typical value allows),
    at one granularity each, taking the granularities in turn (the transform acts on the
    meta-parameter before it is split per tensor, the same for all four)."""
    out: list[tuple[str, str, str, str]] = []
    for opt_name, hyper in ALL:
        inner = bind(setup(opt_name, "group", _start_settings(opt_name, hyper))[1])
        valid = valid_range(inner, hyper)
        start = {float(values[hyper]) for values in inner.group_hypers()}
        for kind, image in (("log", LOG), ("logit", LOGIT)):
            if valid.covers(image) and all(x in image for x in start):
                offered = capabilities()[opt_name][hyper]
                out.append((opt_name, hyper, offered[len(out) % len(offered)], kind))
    return out


TRANSFORM_CASES = _transform_cases()


@pytest.mark.parametrize("opt_name,hyper,per,kind", TRANSFORM_CASES,
                         ids=["-".join(c) for c in TRANSFORM_CASES])
def test_log_and_logit_hypergradients(opt_name: str, hyper: str, per: str, kind: str) -> None:
    """The hypergradient w.r.t. z (x = exp z, or σ(z)) equals the full autograd unroll through
    the transform, and the chain rule on the hypergradient w.r.t. x of the same problem
    learned with 'project': ∂L/∂z = ∂L/∂x · x (log) or · x(1 − x) (logit)."""
    settings = _start_settings(opt_name, hyper)
    model, opt = setup(opt_name, per, settings)
    train, val = batches_after_real_steps(opt_name, model, opt, seed=4)
    meta = gimli.MetaParams(opt, {hyper: per}, transform={hyper: kind})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    got = solver.hypergradient(train, val)
    ref = gimli.full_unroll_hypergradient(solver, train, val)
    assert ref[f"hypers.{hyper}"].abs().sum() > 0, "a case that tests nothing"
    assert_hypergradients_close(got, ref)

    x = meta.value(hyper).detach()
    twin_model, twin_opt = copy.deepcopy((model, opt))
    plain = gimli.MetaParams(twin_opt, {hyper: per})
    with torch.no_grad():
        plain.hyper(hyper).copy_(x)                 # the very values the transform gives
    d_x = gimli.GimliSolver(twin_model, lambda m, b, meta: mse(m, b), twin_opt, plain) \
        .hypergradient(train, val)[f"hypers.{hyper}"]
    chain = d_x * (x if kind == "log" else x * (1 - x))
    assert_hypergradients_close({"z": got[f"hypers.{hyper}"]}, {"z": chain})


@pytest.mark.parametrize("hyper,kind", [("lr", "log"), ("beta2", "logit"), ("eps", "log")])
def test_transform_against_finite_differences_of_torch(hyper: str, kind: str) -> None:
    """∂L^val/∂z by central differences of the real torch.optim.Adam unroll run with the
    hyperparameter exp(z ± h) or σ(z ± h)."""
    model, opt = setup("Adam", "scalar", dict(lr=0.02, betas=(0.8, 0.9), eps=1e-3))
    batches = regression_batches(5, 3, 2, 4)
    meta = gimli.MetaParams(opt, {hyper: "scalar"}, transform={hyper: kind})
    got = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta) \
        .hypergradient(batches[:3], batches[3])[f"hypers.{hyper}"]
    z = meta.hyper(hyper).item()

    def val_loss(zz: float) -> float:
        value = math.exp(zz) if kind == "log" else 1 / (1 + math.exp(-zz))
        m, o = copy.deepcopy((model, opt))
        for group in o.param_groups:
            if hyper == "beta2":
                group["betas"] = (group["betas"][0], value)
            else:
                group[hyper] = value
        for batch in batches[:3]:
            o.zero_grad()
            mse(m, batch).backward()
            o.step()
        with torch.no_grad():
            return float(mse(m, batches[3]))

    h = 1e-5
    fd = (val_loss(z + h) - val_loss(z - h)) / (2 * h)
    assert abs(float(got) - fd) <= 1e-6 * abs(fd) + 1e-9, (float(got), fd)


def test_refused_transforms_say_why() -> None:
    model, opt = setup("Adam", "group", dict(lr=0.02, weight_decay=0.0))
    with pytest.raises(ValueError, match=r"'log' maps onto \(0, ∞\).*\[0, 1\).*'logit'"):
        gimli.MetaParams(opt, {"beta1": "scalar"}, transform={"beta1": "log"})
    _, adafactor = setup("Adafactor", "group")
    with pytest.raises(ValueError, match=r"'logit' maps onto \(0, 1\).*for d, \[1, ∞\): use 'project'$"):
        gimli.MetaParams(adafactor, {"d": "group"}, transform={"d": "logit"})
    with pytest.raises(ValueError, match=r"'log' maps onto \(0, ∞\).*beta2_decay, \(−∞, 0\]"):
        gimli.MetaParams(adafactor, {"beta2_decay": "group"}, transform={"beta2_decay": "log"})
    with pytest.raises(ValueError, match=r"cannot represent the initial weight_decay = 0.0"):
        gimli.MetaParams(opt, {"weight_decay": "scalar"}, transform={"weight_decay": "log"})
    with pytest.raises(ValueError, match="must be one of"):
        gimli.MetaParams(opt, {"lr": "group"}, transform={"lr": "softplus"})
    with pytest.raises(ValueError, match="does not declare"):
        gimli.MetaParams(opt, {"lr": "group"}, transform={"eps": "log"})
    _, rprop = setup("Rprop", "scalar")
    with pytest.raises(ValueError, match=r"etaplus, \(1, ∞\)"):      # η₊ > 1: only 'project'
        gimli.MetaParams(rprop, {"etaplus": "scalar"}, transform={"etaplus": "log"})


def test_logit_rounding_to_one_is_guarded() -> None:
    """σ(z) is exactly 1.0 in float32 for z ≥ 17: the value used and written is the float32
    number below 1; exp(z) underflowing to 0 for a range that excludes 0 likewise."""
    torch.manual_seed(0)
    model = mlp([3, 4, 2], "tanh").float()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    meta = gimli.MetaParams(opt, {"beta2": "scalar"}, transform={"beta2": "logit"})
    with torch.no_grad():
        meta.hyper("beta2").fill_(40.0)
    assert torch.sigmoid(meta.hyper("beta2")).item() == 1.0
    below = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    assert meta.value("beta2").item() == below
    assert all(v.item() == below for v in meta.hyper_values("beta2"))
    meta.write_back()
    assert opt.param_groups[0]["betas"][1] == below

    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meta = gimli.MetaParams(sgd, {"momentum": "scalar"}, transform={"momentum": "log"})
    with torch.no_grad():
        meta.hyper("momentum").fill_(-200.0)
    assert meta.hyper("momentum").exp().item() == 0.0
    meta.write_back()
    assert sgd.param_groups[0]["momentum"] > 0.0


def test_default_is_project_and_real_ranges_are_untouched() -> None:
    """'project' is the default; a range the constructor does not check (SGD's dampening)
    is the whole line, and projection leaves its values alone."""
    model, opt = setup("SGD", "scalar")
    meta = gimli.MetaParams(opt, {"dampening": "scalar", "lr": "scalar"})
    assert meta.transform == {"dampening": "project", "lr": "project"}
    assert meta.ranges["dampening"] == REAL
    with torch.no_grad():
        meta.hyper("dampening").fill_(-3.0)
        meta.hyper("lr").fill_(-3.0)
    meta.constrain_()
    assert meta.hyper("dampening").item() == -3.0 and meta.hyper("lr").item() == 0.0


def test_gimli_check_with_transforms() -> None:
    """gimli.check reads the transformed values through the solver: log and logit
    meta-parameters pass against the autograd unroll and finite differences in z."""
    model, opt = setup("Adam", "group", dict(lr=0.02, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.01))
    meta = gimli.MetaParams(opt, {"lr": "tensor", "beta2": "group", "weight_decay": "scalar"},
                            transform={"lr": "log", "beta2": "logit", "weight_decay": "log"})
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta)
    batches = regression_batches(6, 3, 2, 4)
    report = gimli.assert_hypergradients_correct(solver, batches[:3], batches[3])
    assert {p.name for p in report.params} == {"hypers.lr", "hypers.beta2", "hypers.weight_decay"}
    assert all(p.elements > 0 for p in report.params)


def test_an_infinite_meta_update_is_reported_not_projected() -> None:
    """Projection does not hide a diverged meta-update: an lr thrown to +∞ stays ∞, so the
    solver reports a non-finite meta-parameter (and skips the step, changing nothing)."""
    model, opt = setup("SGD", "scalar")
    meta = gimli.MetaParams(opt, {"lr": "scalar"})
    batches = regression_batches(8, 3, 2, 4)
    grad = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta) \
        .hypergradient(batches[:3], batches[3])["hypers.lr"]
    meta_opt = torch.optim.SGD(meta.parameters(), lr=math.inf, maximize=bool(grad > 0))
    solver = gimli.GimliSolver(model, lambda m, b, meta: mse(m, b), opt, meta, meta_opt=meta_opt)
    with pytest.warns(RuntimeWarning, match="non-finite meta-parameter"):
        result = solver.step(batches[:3], batches[3], on_nonfinite="skip")
    assert result.skipped
    assert opt.param_groups[0]["lr"] == SETTINGS["SGD"]["lr"] == meta.hyper("lr").item()
