"""The floor of an exact hypergradient in eager PyTorch, next to gimli and its peers.

    python benchmarks/floor.py                       # the four floor tasks, J = 20 and 80
    python benchmarks/floor.py --tasks adam_lrs --steps 80 --reps 11

"Floor": Algorithm 1 written out by hand for one task, in two versions. For the SGD
tasks (with or without momentum, no weight decay): a forward unroll that keeps each
G_j with its graph, then a reverse sweep with the closed-form SGD VJP and one
Hessian-vector product per step. For the Adam tasks (lrs meta-learned, no weight
decay, amsgrad or maximize): the same, with the forward also keeping what Adam's VJP
reads (√v̂, its ε-shifted denominator and the update), the constants (β₁, β₂, ε, the
bias corrections, the lrs) as Python floats, and the lrs' cotangent summed once at the
end. Both work over lists of tensors with foreach operations and do nothing else: no
checks, no schedules, no optimizer state read or written back, no view of the model
beyond ``torch.func.functional_call``, and autograd's engine called as gimli calls it,
without ``torch.autograd.grad``'s Python argument checks. It is the least the same
algorithm costs with the same autograd calls, so the distance from it to gimli's
``retain`` is what gimli's generality costs, and the distance from it to the autograd
unroll, higher and TorchOpt says how far any exact method in eager PyTorch can get
ahead of them.

Timing as in ``run.py``: float32, one thread, a warm-up call of every method, then
``--reps`` repetitions with the methods interleaved and their order rotated; a "×" is
the median over repetitions of the ratio of two calls in the same repetition. Each
floor hypergradient is also compared with retain's (float32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import Run, missing, prepare  # noqa: E402
from tasks import TASKS, Batch, Instance  # noqa: E402

FLOOR_TASKS = ("maml_sine", "l2_momentum", "adam_lrs", "cnn_adam")


_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _grad(outputs: Tensor | Sequence[Tensor], inputs: list[Tensor], cotangents: Sequence[Tensor] | None = None,
          create_graph: bool = False) -> list[Tensor]:
    """``torch.autograd.grad(outputs, inputs, cotangents, create_graph=...)``, straight into
    the autograd engine where this torch has that entry: without the Python argument
    checks ``grad`` repeats on every call (tens of µs), which gimli skips too, so that the
    floor pays nothing gimli does not."""
    outs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
    cots = tuple(torch.ones_like(o) for o in outs) if cotangents is None else tuple(cotangents)
    if _ENGINE is None:
        return list(torch.autograd.grad(outs, inputs, cots, create_graph=create_graph))
    return list(_ENGINE(outs, cots, create_graph, create_graph, tuple(inputs), False, accumulate_grad=False))


def _at(inst: Instance, names: list[str], theta: list[Tensor]) -> tuple[list[Tensor], dict[str, Tensor], Any]:
    """θ as fresh leaves, by name, and the model called at them."""
    t = [x.detach().requires_grad_() for x in theta]
    params = dict(zip(names, t))
    return t, params, lambda x: functional_call(inst.model, params, (x,), tie_weights=False)


def _val_grad(inst: Instance, names: list[str], theta: list[Tensor]) -> list[Tensor]:
    """B_J = ∇L^val(θ'_J)."""
    t, _, call = _at(inst, names, theta)
    return _grad(inst.val_loss(call, inst.val), t)


def floor(inst: Instance) -> Run:
    """The hand-written Algorithm 1 for the task: SGD's or Adam's."""
    return adam_floor(inst) if inst.opt_class is torch.optim.Adam else sgd_floor(inst)


def sgd_floor(inst: Instance) -> Run:
    """The hand-written Algorithm 1 for an SGD task (θ₀ or φ^loss meta-learned)."""
    assert inst.opt_class is torch.optim.SGD and not inst.opt_kwargs.get("weight_decay", 0)
    model = inst.model
    names = [n for n, _ in model.named_parameters()]
    lr = float(inst.opt_kwargs["lr"])
    mu = float(inst.opt_kwargs.get("momentum", 0.0))

    def run(batches: Sequence[Batch]) -> Tensor:
        phi = {k: v.detach().clone().requires_grad_() for k, v in inst.phi_loss.items()}
        leaves = list(phi.values())
        theta = [p.detach() for p in model.parameters()]
        buf: list[Tensor] | None = None
        kept: list[tuple[list[Tensor], tuple[Tensor, ...]]] = []
        for batch in batches:                                   # forward: G_j with its graph
            t, params, call = _at(inst, names, theta)
            loss = inst.loss(call, params, batch, phi)
            G = _grad(loss, t, create_graph=True)
            kept.append((t, G))
            with torch.no_grad():
                d = [g.detach() for g in G]
                if mu:
                    buf = d if buf is None else list(torch._foreach_add(torch._foreach_mul(buf, mu), d))
                    d = buf
                theta = list(torch._foreach_add(theta, d, alpha=-lr))
        B = _val_grad(inst, names, theta)
        S: list[Tensor] | None = None                           # the buffer's cotangent
        A = [torch.zeros_like(x) for x in leaves]
        for j in reversed(range(len(kept))):                    # the sweep
            t, G = kept.pop()
            o = list(torch._foreach_mul(B, -lr))                # d̄ = −γ B
            if mu:
                o = o if S is None else list(torch._foreach_add(S, o))  # b̄' = S + d̄, and o_j = b̄'
                S = list(torch._foreach_mul(o, mu)) if j > 0 else None  # S_j = μ b̄' (none at the first)
            hm = _grad(G, t + leaves, o)
            B = list(torch._foreach_add(B, list(hm[:len(t)])))
            A = list(torch._foreach_add(A, list(hm[len(t):]))) if leaves else A
        out = B if inst.kind == "init" else A             # θ₀'s hypergradient is B₀
        return torch.cat([x.reshape(-1) for x in out]).detach()
    return run


def adam_floor(inst: Instance) -> Run:
    """The hand-written Algorithm 1 for Adam (no weight decay, amsgrad or maximize, from
    a fresh state) with its learning rate meta-learned, one per param group.

    Everything that does not depend on the hypergradient's inputs is a Python float
    (β₁, β₂, ε, the bias corrections, each group's lr), every elementwise step is a
    foreach call over the parameter tensors, the forward keeps what the VJP reads (G_j
    and its graph, δ = √v'/√c₂ + ε, the update m'/δ and the update over √v'/√c₂, 0 where
    that root is 0: gimli's guard), and the lrs' cotangent
    is accumulated per element and summed once at the end.
    """
    assert inst.opt_class is torch.optim.Adam and inst.kind == "lr"
    kw = inst.opt_kwargs
    assert not kw.get("weight_decay", 0) and not kw.get("amsgrad") and not kw.get("maximize")
    b1, b2 = kw.get("betas", (0.9, 0.999))
    eps = float(kw.get("eps", 1e-8))
    model = inst.model
    names = [n for n, _ in model.named_parameters()]
    group_of = {n: i for i, g in enumerate(inst.lr_groups) for n in g}
    groups = [group_of[n] for n in names]                   # each tensor's group
    tiny = torch.finfo(next(model.parameters()).dtype).tiny

    def run(batches: Sequence[Batch]) -> Tensor:
        lr = [float(kw["lr"])] * len(names)                     # (every group starts at the same lr)
        theta = [p.detach() for p in model.parameters()]
        m = [torch.zeros_like(x) for x in theta]
        v = [torch.zeros_like(x) for x in theta]
        kept: list[tuple[list[Tensor], tuple[Tensor, ...], list[Tensor], list[Tensor], list[Tensor]]] = []
        for j, batch in enumerate(batches):                     # forward
            t, params, call = _at(inst, names, theta)
            loss = inst.loss(call, params, batch, {})
            G = _grad(loss, t, create_graph=True)
            with torch.no_grad():
                c1, c2 = 1 - b1 ** (j + 1), 1 - b2 ** (j + 1)
                m = list(torch._foreach_lerp(m, G, 1 - b1))
                v = list(torch._foreach_mul(v, b2))
                torch._foreach_addcmul_(v, G, G, 1 - b2)
                r = list(torch._foreach_sqrt(v))
                torch._foreach_div_(r, c2 ** 0.5)
                den = list(torch._foreach_add(r, eps))
                u = list(torch._foreach_div(m, den))
                theta = list(torch._foreach_add(theta, torch._foreach_mul(u, [-x / c1 for x in lr])))
                # w = u/r, the factor of δ̄ that ū's division by r needs, and 0 where r = 0
                # (the guard at √0, as gimli's)
                w = list(torch._foreach_sign(r))                # (r ≥ 0: 1 where r > 0, else 0)
                torch._foreach_mul_(w, u)
                torch._foreach_div_(w, torch._foreach_clamp_min(r, tiny))
            kept.append((t, G, den, u, w))
        B = _val_grad(inst, names, theta)
        Sm: list[Tensor] | None = None
        Sv: list[Tensor] | None = None
        acc = [torch.zeros_like(x) for x in theta]              # ∂/∂γ per element, summed at the end
        for j in reversed(range(len(kept))):                    # the sweep
            t, G, den, u, w = kept.pop()
            with torch.no_grad():
                c1, c2 = 1 - b1 ** (j + 1), 1 - b2 ** (j + 1)
                torch._foreach_addcmul_(acc, B, u, -1 / c1)     # θ' = θ − (γ/c₁)·u
                kP = list(torch._foreach_div(B, den))
                torch._foreach_mul_(kP, [x / c1 for x in lr])   # κP/δ
                mb = list(torch._foreach_neg(kP)) if Sm is None else list(torch._foreach_sub(Sm, kP))
                db = list(torch._foreach_mul(kP, w))            # δ̄/r
                vb = list(torch._foreach_mul(db, 0.5 / c2)) if Sv is None \
                    else list(torch._foreach_add(Sv, db, alpha=0.5 / c2))
                gb = list(torch._foreach_mul(mb, 1 - b1))
                torch._foreach_addcmul_(gb, G, vb, 2 * (1 - b2))
                Sm = list(torch._foreach_mul(mb, b1))
                Sv = list(torch._foreach_mul(vb, b2))
            h = _grad(G, t, gb)
            torch._foreach_add_(B, h)
        out = torch.zeros(len(inst.lr_groups), dtype=acc[0].dtype)
        for i, a in zip(groups, acc):
            out[i] += a.sum()
        return out
    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(FLOOR_TASKS))
    parser.add_argument("--steps", default="20,80")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    others = ["retain", "autograd"] + [m for m in ("higher", "torchopt") if missing(m) is None]
    for name in args.tasks.split(","):
        if name not in FLOOR_TASKS:
            raise SystemExit(f"the floor is written for these tasks only: {', '.join(FLOOR_TASKS)}")
        print(f"\n### {name}: {TASKS[name].summary}\n")
        print("× the floor (the median over repetitions of the ratio of two calls in the same repetition)\n")
        print("| J | floor (ms) | " + " | ".join(f"{m} ×" for m in others) + " | floor vs retain (max rel. diff) |")
        print("|---:|---:|" + "---:|" * len(others) + "---:|")
        for J in (int(s) for s in args.steps.split(",")):
            inst = TASKS[name].build(J)
            runs = {"floor": floor(inst), **{m: prepare(m, inst) for m in others}}
            got = {m: r(inst.train) for m, r in runs.items()}          # warm-up, and the values
            ref = got["retain"]
            assert ref is not None and got["floor"] is not None
            diff = float((got["floor"] - ref).abs().max() / ref.abs().max())
            times: dict[str, list[float]] = {m: [] for m in runs}
            order = list(runs)
            for _ in range(args.reps):
                order = order[1:] + order[:1]
                for m in order:
                    start = time.perf_counter()
                    runs[m](inst.train)
                    times[m].append(time.perf_counter() - start)
            ratio = {m: statistics.median(a / b for a, b in zip(times[m], times["floor"])) for m in others}
            print(f"| {J} | {1e3 * statistics.median(times['floor']):.1f} | "
                  + " | ".join(f"{ratio[m]:.2f}" for m in others) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
