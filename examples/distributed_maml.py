"""MAML on sine waves across processes: each rank adapts to its share of the meta-batch,
and gimli all-reduces the hypergradients before the meta-update.

Launch with torchrun (one process per GPU, or several on a CPU):

    torchrun --nproc_per_node=2 examples/distributed_maml.py            # full run
    torchrun --nproc_per_node=2 examples/distributed_maml.py --quick    # the CI run
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=4 examples/distributed_maml.py

Every rank draws the same meta-batch of tasks from the same seed and keeps the tasks
``rank, rank + world, ...``; ``GimliSolver`` sees the initialized process group and
averages the hypergradients over all ranks' tasks (``torch.distributed.all_reduce``),
so every rank applies the identical meta-update. Run without torchrun, it is a single
process with the whole meta-batch: the same numbers (up to summation order).
The backend is NCCL where CUDA is available, gloo otherwise. Rank 0 prints the
post-adaptation MSE on held-out tasks (adapted with the real torch.optim.SGD), before
and after meta-training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import gimli

if str(Path(__file__).resolve().parent) not in sys.path:       # maml_sine.py sits beside this
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support import one_thread  # noqa: E402
from maml_sine import INNER_LR, TEST_SEED, loss_fn, mean_adapted_mse, sample_task  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--iterations", type=int, help="meta-iterations (default 1000; quick 20)")
    parser.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-iteration, all ranks")
    parser.add_argument("--steps", type=int, default=1, help="J, inner SGD steps per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with one_thread():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    iterations = args.iterations or (20 if args.quick else 1000)

    launched = "RANK" in os.environ                                  # under torchrun
    if launched:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if launched and torch.cuda.is_available() \
        else torch.device("cpu")
    try:
        torch.manual_seed(args.seed)                                 # the same θ₀ on every rank
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                              nn.Linear(40, 1)).to(device)
        inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        meta = gimli.MetaParams(init=model)
        meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
        solver = gimli.GimliSolver(model, loss_fn, inner_opt, meta, meta_opt=meta_opt, steps=args.steps)
        gen = torch.Generator().manual_seed(args.seed)               # the same tasks on every rank
        test_tasks = [sample_task(torch.Generator().manual_seed(TEST_SEED + i)) for i in range(50)]

        def on(task: Any) -> Any:
            return type(task)(*((x.to(device), y.to(device)) for x, y in task))

        before = mean_adapted_mse(model, inner_opt, [on(t) for t in test_tasks], args.steps)
        for it in range(iterations):
            tasks = [sample_task(gen) for _ in range(args.meta_batch)]
            mine = [on(t) for t in tasks[rank::world]]
            result = solver.step(tasks=[([t.support] * args.steps, t.query) for t in mine])
            if rank == 0 and (it % max(1, iterations // 5) == 0 or it == iterations - 1):
                print(f"iteration {it + 1:5d}  meta-batch query loss {result.val_loss:.4f}", flush=True)
        solver.check_replicas()                                      # every rank holds the same θ₀
        after = mean_adapted_mse(model, inner_opt, [on(t) for t in test_tasks], args.steps)
        if rank == 0:
            print(f"{world} process(es): post-adaptation MSE on {len(test_tasks)} test tasks "
                  f"before {before:.4f}, after {after:.4f}")
        return {"before": before, "after": after, "world": world,
                "checksum": float(sum(p.detach().double().sum() for p in model.parameters()))}
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
