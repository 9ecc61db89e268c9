"""The verification zoo behind ``gimli check``: every built-in optimizer × meta-parameter
kind, gimli's sweep against the full autograd unroll (``_oracle.py``) in float64.

Each case is a small two-group tanh MLP (bias-free for Muon, which steps matrices
only), an optimizer at its typical settings (``optim/_settings.py``'s TYPICAL: every
option that keeps a hyperparameter in play on; ``CHANGES`` adds a flag's other
branch), J inner steps on random regression batches, and one solver that learns, at
one granularity, every hyperparameter the optimizer offers there, an L2 coefficient
(φ^loss) and the initial weights (θ₀) at once. The error of a kind
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
from .optim._settings import TYPICAL
from .optim.learned import LearnedOptimizer, default_net

TOLERANCE = 1e-9

# the zoo's rows besides one per optimizer at its typical settings (optim/_settings.py's
# TYPICAL): a flag's other branch, as changes to the settings of the optimizer the row's
# name starts with; a row named by the optimizer alone changes its own row. Listed in
# TYPICAL's order, each variant right after its optimizer.
CHANGES: dict[str, dict[str, Any]] = {
    "SGD nesterov": dict(nesterov=True, dampening=0.0),     # Nesterov momentum needs dampening 0
    "Adam": dict(amsgrad=False),                            # the typical Adam has AMSGrad on
    "Adam amsgrad": dict(amsgrad=True),
}


def _constructor(name: str) -> Callable[..., torch.optim.Optimizer] | None:
    """The optimizer's class (None where this torch has none)."""
    if name == "LearnedOptimizer":
        return lambda groups, **kw: LearnedOptimizer(groups, net=default_net().double(), **kw)
    return getattr(torch.optim, name, None)


def _zoo() -> dict[str, tuple[Callable[..., torch.optim.Optimizer] | None, dict[str, Any]]]:
    zoo = {}
    for name, settings in TYPICAL.items():
        for row in [name] + [row for row in CHANGES if row.startswith(name + " ")]:
            zoo[row] = (_constructor(name), {**settings, **CHANGES.get(row, {})})
    return zoo


# row name → (optimizer class, constructor keyword arguments)
ZOO: dict[str, tuple[Callable[..., torch.optim.Optimizer] | None, dict[str, Any]]] = _zoo()
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
    off = {h for flags in bound.flags for h in bound.rule.inactive_hypers(flags)}  # refused there
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
