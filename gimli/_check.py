"""The verification zoo behind ``gimli check``: every built-in optimizer × meta-parameter
kind, gimli's sweep against the full autograd unroll (``_oracle.py``) in float64.

Each case is a small two-group tanh MLP (bias-free for Muon, which steps matrices
only), an optimizer with its options switched on (momentum, weight decay,
AMSGrad, ...), J inner steps on random regression batches, and one solver that
learns, at one granularity, every hyperparameter the optimizer offers there, an
L2 coefficient (φ^loss) and the initial weights (θ₀) at once. The error of a kind
is max |g − g_ref| / max |g_ref| over its meta-parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._meta import MetaParams
from ._oracle import full_unroll_hypergradient
from ._solver import GimliSolver
from .optim import bind, capabilities
from .optim.learned import LearnedOptimizer, default_net

TOLERANCE = 1e-9

# one representative setting per optimizer: every option that changes the update on
ZOO: dict[str, tuple[Callable[..., torch.optim.Optimizer] | None, dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Adam": (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01)),
    "Adam amsgrad": (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, amsgrad=True)),
    "AdamW": (torch.optim.AdamW, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-3,
                                          initial_accumulator_value=0.1)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.01,
                                          momentum=0.5, centered=True)),
    "Adadelta": (torch.optim.Adadelta, dict(lr=0.5, rho=0.9, eps=1e-3, weight_decay=0.01)),
    "Adamax": (torch.optim.Adamax, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01)),
    "NAdam": (torch.optim.NAdam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01,
                                      momentum_decay=4e-3)),
    "RAdam": (torch.optim.RAdam, dict(lr=0.02, betas=(0.8, 0.6), eps=1e-3, weight_decay=0.01)),
    "Rprop": (torch.optim.Rprop, dict(lr=0.01, etas=(0.5, 1.2), step_sizes=(0.0045, 0.0125))),
    "ASGD": (torch.optim.ASGD, dict(lr=0.02, lambd=1e-3, alpha=0.75, t0=1.0, weight_decay=0.01)),
    "Adafactor": (getattr(torch.optim, "Adafactor", None), dict(lr=0.02, weight_decay=0.01)),
    "Muon": (getattr(torch.optim, "Muon", None), dict(lr=0.02, momentum=0.9, weight_decay=0.01)),
    "LearnedOptimizer": (lambda groups, **kw: LearnedOptimizer(groups, net=default_net().double(), **kw),
                         dict(lr=0.05, beta=0.9)),
}
KINDS = ("φ^opt", "φ^loss", "θ₀")


class Case(NamedTuple):
    optimizer: str
    granularity: str
    hypers: tuple[str, ...]
    errors: dict[str, float]        # kind → max relative error (nan where the kind is absent)
    zero: tuple[str, ...]           # meta-parameters whose reference hypergradient is all 0

    @property
    def passed(self) -> bool:
        return all(e <= TOLERANCE for e in self.errors.values() if e == e)


def relative_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """max |g − g_ref| / max |g_ref| over a list of tensors (0 when both vanish)."""
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    scale = max(float(w.abs().max()) for w in want)
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _kind(name: str) -> str:
    return {"hypers": "φ^opt", "loss": "φ^loss", "init": "θ₀"}[name.split(".")[0]]


def run_case(optimizer: str, granularity: str, steps: int = 4, seed: int = 0) -> Case | None:
    """One zoo case; None where the optimizer offers no hyperparameter at this
    granularity or this torch has no such class."""
    cls, kwargs = ZOO[optimizer]
    if cls is None:
        return None
    name = optimizer.split()[0]
    offered = capabilities()[name]
    hypers = tuple(h for h, per in offered.items() if granularity in per
                   and not (h == "net" and granularity != "scalar"))
    torch.manual_seed(seed)
    matrices_only = name == "Muon"
    model = nn.Sequential(nn.Linear(3, 4, bias=not matrices_only), nn.Tanh(),
                          nn.Linear(4, 2, bias=not matrices_only)).double()
    first, second = model[0], model[2]
    lr2 = kwargs["lr"] * (1.0 if granularity == "scalar" else 0.7)    # a scalar is shared
    opt = cls([{"params": list(first.parameters())},
               {"params": list(second.parameters()), "lr": lr2}], **kwargs)
    bound = bind(opt)
    off = {h for flags in bound.flags for h in bound.facts.inactive_hypers(flags)}  # refused there
    hypers = tuple(h for h in hypers if h not in off)
    if not hypers:
        return None
    meta = MetaParams(opt, {h: granularity for h in hypers},
                      loss={"l2": torch.tensor(0.01, dtype=torch.float64)}, init=model)

    def loss_fn(m: Any, batch: tuple[Tensor, Tensor], meta: MetaParams) -> Tensor:
        x, y = batch
        return ((m(x) - y) ** 2).mean() + meta["l2"] * sum((p ** 2).sum() for p in m.parameters())

    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(6, 3, generator=gen, dtype=torch.float64),
                torch.randn(6, 2, generator=gen, dtype=torch.float64)) for _ in range(steps + 1)]
    solver = GimliSolver(model, loss_fn, opt, meta)
    got = solver.hypergradient(batches[:steps], batches[steps])
    want = full_unroll_hypergradient(solver, batches[:steps], batches[steps])
    errors = {}
    for kind in KINDS:
        names = [n for n in got if _kind(n) == kind]
        errors[kind] = relative_error([got[n] for n in names], [want[n] for n in names]) \
            if names else float("nan")
    zero = tuple(n for n in got if not bool(want[n].any()))
    return Case(optimizer, granularity, hypers, errors, zero)


def run_zoo(optimizers: Sequence[str] | None = None, steps: int = 4,
            granularities: Sequence[str] = ("scalar", "group", "tensor", "element"),
            progress: Callable[[str], None] | None = None) -> list[Case]:
    cases = []
    for optimizer in optimizers or ZOO:
        if optimizer not in ZOO:
            raise ValueError(f"unknown optimizer {optimizer!r}; one of {', '.join(ZOO)}")
        for granularity in granularities:
            if progress is not None:
                progress(f"{optimizer} / {granularity}")
            case = run_case(optimizer, granularity, steps)
            if case is not None:
                cases.append(case)
    return cases


def table(cases: Sequence[Case]) -> str:
    """The zoo's results as a plain-text table with a verdict per row."""
    def fmt(e: float) -> str:
        return "—" if e != e else f"{e:.1e}"

    def learned(c: Case) -> str:
        zero = f" (zero hypergradient: {', '.join(c.zero)})" if c.zero else ""
        return " ".join(c.hypers) + zero

    rows: list[tuple[str, ...]] = [("optimizer", "granularity", *KINDS, "verdict",
                                    "hyperparameters learned")]
    rows += [(c.optimizer, c.granularity, *(fmt(c.errors[k]) for k in KINDS),
              "pass" if c.passed else "FAIL", learned(c)) for c in cases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
