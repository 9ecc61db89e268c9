"""Which hypergradient is right where the libraries disagree (cnn_adam: higher differs,
the autograd unroll and torchopt give NaN): central finite differences of the real
``torch.optim`` unroll, in float64, against each method's hypergradient.

    python benchmarks/fd_check.py                 # cnn_adam, J = 5
    python benchmarks/fd_check.py adam_lrs 20

Each learned lr is moved by ±h (h = 1e-6·lr) in the real optimizer's param groups
(the same group structure the task uses), J steps are taken on a copy, and L^val
is differenced; the methods see the same problem converted to float64.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import METHODS, missing, prepare  # noqa: E402
from tasks import TASKS, Instance  # noqa: E402


def to_double(inst: Instance) -> Instance:
    inst.model = inst.model.double()
    inst.train = [(x.double() if x.is_floating_point() else x, y.double() if y.is_floating_point() else y)
                  for x, y in inst.train]
    x, y = inst.val
    inst.val = (x.double(), y.double() if y.is_floating_point() else y)
    inst.phi_loss = {k: v.double() for k, v in inst.phi_loss.items()}
    return inst


def val_after(inst: Instance, lrs: list[float]) -> float:
    model = copy.deepcopy(inst.model)
    opt = inst.make_opt(model)
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    phi = {k: v.detach() for k, v in inst.phi_loss.items()}
    for batch in inst.train:
        opt.zero_grad()
        inst.loss(model, dict(model.named_parameters()), batch, phi).backward()
        opt.step()
    with torch.no_grad():
        return inst.val_loss(model, inst.val).item()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    task = argv[0] if argv else "cnn_adam"
    J = int(argv[1]) if len(argv) > 1 else 5
    torch.set_num_threads(1)
    inst = to_double(TASKS[task].build(J))
    if inst.kind != "lr":
        raise SystemExit("finite differences are written for the learned-lr tasks")
    lr0 = float(inst.opt_kwargs["lr"])
    n = len(inst.lr_groups)
    h = 1e-6 * lr0      # at h ≥ 1e-4·lr the CNN's differences cross ReLU kinks and
    #                     Adam's |g| ≈ ε region and are off by O(1); from 1e-5·lr down they agree
    fd = []
    for g in range(n):
        up = [lr0 + (h if k == g else 0.0) for k in range(n)]
        down = [lr0 - (h if k == g else 0.0) for k in range(n)]
        fd.append((val_after(inst, up) - val_after(inst, down)) / (2 * h))
    ref = torch.tensor(fd, dtype=torch.float64)
    print(f"{task}, J = {J}, float64; finite differences of the real torch.optim unroll:")
    print(f"  {'finite diff.':>14s}  {ref.tolist()}")
    for m in METHODS[1:]:
        if missing(m):
            continue
        got = prepare(m, inst)(inst.train)
        assert got is not None
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"  {m:>14s}  max rel. diff {err:.1e}")


if __name__ == "__main__":
    main()
