"""Where a hypergradient's time goes: py-spy samples, grouped by Algorithm 1's phases.

    pip install py-spy
    python benchmarks/phases.py adam_lrs 80 retain autograd      # TASK J METHOD...
    python benchmarks/phases.py cnn_adam 20 recompute --seconds 20

Each method runs in its own process under ``py-spy record`` (sampling, so the
Python-level overhead it measures is not inflated the way cProfile's is) for
``--seconds`` after a warm-up call; only samples inside the timed calls count.
A sample goes to the first phase of the lists below whose frames it contains: for
gimli, the forward unroll's loss, G_j and optimizer step (lines 4–7, rerun by
recompute/budget), the sweep's optimizer VJP (lines 11–12), its
Hessian-vector product (lines 13–14), and the join (line 16); for the
autograd unroll, its forward pieces and the one backward through all steps.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import METHODS, Run, prepare  # noqa: E402
from tasks import TASKS, Batch  # noqa: E402

RATE = 250  # samples per second

# (phase, the stack must contain all of these) — first match wins
GIMLI_PHASES = [
    ("forward: ℓ_j (loss)", ["Unroll.", "Problem.train_loss"]),
    ("forward: G_j = ∇ℓ_j", ["Unroll.", "Problem.inner_grads"]),
    ("forward: optimizer step", ["Unroll.", "step (gimli/optim"]),
    ("forward: other", ["Unroll."]),
    ("sweep: optimizer VJP (b, S, o, a)", ["sweep (gimli/_sweep.py", "vjp (gimli/optim"]),
    ("sweep: L^val and B_J", ["sweep (gimli/_sweep.py", "val_loss"]),
    ("sweep: HVP (h_j, m_j)", ["sweep (gimli/_sweep.py", "grad_of (gimli/_problem.py"]),
    ("sweep: other (accumulators, lists)", ["sweep (gimli/_sweep.py"]),
    ("join (line 16)", ["_join (gimli/_solver.py"]),
]
AUTOGRAD_PHASES = [
    ("forward: ℓ_j (loss)", ["_full_unroll", "Problem.train_loss"]),
    ("forward: G_j = ∇ℓ_j (create_graph)", ["_full_unroll", "Problem.inner_grads"]),
    ("forward: optimizer step", ["_full_unroll", "step (gimli/optim"]),
    ("L^val", ["_full_unroll", "val_loss"]),
    ("backward through all J steps", ["_full_unroll", "grad (torch/autograd/__init__.py"]),
]
OTHER_PHASES = [
    ("torch.autograd.grad (G_j and the final backward)", ["grad (torch/autograd/__init__.py"]),
]


def _measured(run: Run, batches: Sequence[Batch]) -> Tensor | None:
    """The frame a sample must be under to count (the warm-up and setup are not)."""
    return run(batches)


def loop(task: str, J: int, method: str, seconds: float) -> None:
    torch.set_num_threads(1)
    inst = TASKS[task].build(J)
    run = prepare(method, inst)
    run(inst.train)                                     # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        _measured(run, inst.train)
        calls += 1
    print(f"CALLS {calls} {time.perf_counter() - start}")


def classify(stack: str, method: str) -> str:
    phases = (AUTOGRAD_PHASES if method == "autograd"
              else GIMLI_PHASES if method in ("retain", "recompute", "budget") else OTHER_PHASES)
    for name, needles in phases:
        if all(n in stack for n in needles):
            return name
    return "other (library code, Python glue)"


def profile(task: str, J: int, method: str, seconds: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.txt")
        cmd = ["py-spy", "record", "-r", str(RATE), "-f", "raw", "-o", raw, "--",
               sys.executable, os.path.abspath(__file__), "--loop", task, str(J), method, str(seconds)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        match = re.search(r"CALLS (\d+) ([\d.]+)", proc.stdout)
        if proc.returncode != 0 or match is None or not os.path.exists(raw):
            return f"{method}: py-spy failed: {proc.stderr.strip()[-400:]}"
        calls, wall = int(match.group(1)), float(match.group(2))
        counts: collections.Counter[str] = collections.Counter()
        with open(raw) as f:
            for line in f:
                stack, count = line.rstrip("\n").rsplit(" ", 1)
                if "_measured (" in stack:
                    counts[classify(stack, method)] += int(count)
    total = sum(counts.values())
    lines = [f"#### {task}, J = {J}, {method}: {wall / calls * 1000:.0f} ms per call "
             f"({calls} calls, {total} samples)", "", "| phase | ms per call | share |", "|---|---:|---:|"]
    for name, n in counts.most_common():
        lines.append(f"| {name} | {n / RATE / calls * 1000:.1f} | {100 * n / total:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("J", type=int)
    parser.add_argument("methods", nargs="+", choices=list(METHODS[1:]))
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time per method")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--loop":
        task, J, method, seconds = sys.argv[2:6]
        loop(task, int(J), method, float(seconds))
        return
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("needs py-spy: pip install py-spy")
    for m in args.methods:
        print(profile(args.task, args.J, m, args.seconds), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
