"""Several processes: every rank applies the same meta-update, or every rank fails it.

Each rank unrolls its own tasks and sums their joined hypergradients (line 16's join
is linear, so the sum over ranks is exact). Two all-reduces follow, whatever happened
on the rank:

1. a header: which ranks failed (an exception, or a non-finite loss or gradient) and
   how many steps each unrolled. If any rank failed, every rank raises (or, for a
   non-finite value under ``on_nonfinite="skip"``, skips), so no rank's all-reduce is
   ever matched by another rank's next step;
2. the payload: the hypergradient sums, the task count, the validation losses and
   the per-step training losses, summed over the ranks in one flat tensor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._problem import NonFiniteError


class Sums(NamedTuple):
    """One rank's (or, after :func:`all_reduce`, every rank's) sums over its tasks."""

    grads: dict[str, Tensor]        # joined hypergradients, summed over tasks
    tasks: float
    val_loss: float                 # L^val, summed over tasks
    train_losses: list[float]       # ℓ_j per step j, summed over tasks


def process_group(distributed: bool | None, group: Any) -> Any:
    """The torch.distributed process group hypergradients are averaged over, or None."""
    if distributed is False:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise RuntimeError("distributed=True, but no torch.distributed process group is "
                               "initialized (torch.distributed.init_process_group)")
        return None
    return group if group is not None else dist.group.WORLD


def all_reduce(local: Sums | None, failure: Exception | None, like: dict[str, Tensor],
               group: Any) -> Sums:
    """Every rank's sums, or the same failure raised on every rank.

    ``local`` is this rank's sums, or None with ``failure`` what went wrong here;
    ``like`` gives each hypergradient's shape, dtype and device (the meta-parameters)."""
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = next(iter(like.values())).device
    steps = len(local.train_losses) if local is not None else 0
    header = torch.zeros(2 * world + 3, dtype=torch.float64, device=device)
    if failure is not None:
        header[2 * rank + int(isinstance(failure, NonFiniteError))] = 1
    header[-3:] = torch.tensor([steps, steps ** 2, 1], dtype=torch.float64)
    dist.all_reduce(header, group=group)                                    # 1: the header
    flags = header[:2 * world].view(world, 2).cpu()
    failed = [r for r in range(world) if bool(flags[r].any())]
    if failed:
        if failure is not None:
            raise failure
        where = ", ".join(str(r) for r in failed)
        if all(bool(flags[r, 1]) for r in failed):
            raise NonFiniteError(f"rank(s) {where} met a non-finite loss or gradient; the "
                                 f"meta-step is undone on every rank")
        raise RuntimeError(f"the meta-step failed on rank(s) {where} (see the error there); it "
                           f"is undone on every rank so that all ranks stay equal")
    total, square, ranks = (float(v) for v in header[-3:])
    if abs(square * ranks - total ** 2) > 0.5:
        raise ValueError("the ranks unrolled different numbers of inner steps J; give every "
                         "rank's tasks the same number of training batches (or steps=)")
    assert local is not None
    values = list(local.grads.values())
    dtype = values[0].dtype if len({v.dtype for v in values}) == 1 else torch.float64
    flat = torch.cat([v.reshape(-1).to(dtype) for v in values] + [torch.tensor(
        [local.tasks, local.val_loss, *local.train_losses], dtype=dtype, device=device)])
    dist.all_reduce(flat, group=group)                                      # 2: the payload
    out, start = {}, 0
    for name, v in local.grads.items():
        out[name] = flat[start:start + v.numel()].view_as(v).to(v.dtype)
        start += v.numel()
    rest = flat[start:].tolist()
    return Sums(out, rest[0], rest[1], rest[2:])


def check_replicas(params: list[Tensor], group: Any) -> None:
    """Raise if ``params`` differ between ranks: two all-reduces of them, the elementwise
    maximum and minimum over the ranks, must both equal this rank's values."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    if not (torch.equal(high, flat) and torch.equal(low, flat)):
        raise RuntimeError("the meta-parameters differ between ranks")
