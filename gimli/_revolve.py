"""Binomial checkpointing (revolve: Griewank 1992; Griewank & Walther, ACM TOMS
Algorithm 799): how many forward steps reversing a chain costs, and where to
place the next snapshot so that the count is the optimum.

Reversing n steps (the state before the first one held) with s snapshots in all,
the held one included, takes at least

    t(n, s) = r·n − β(s + 1, r − 1)    forward steps,  β(s, r) = C(s + r, s),

where r is the repetition number: β(s, r − 1) < n ≤ β(s, r). The recursion of
``_unroll.Unroll._revolve`` (advance m steps, place a snapshot there, reverse
the right part with one snapshot fewer, then the left part) attains it when m
minimises m + t(n − m, s − 1) + t(m, s).
"""

from __future__ import annotations

from functools import lru_cache
from math import comb


def forward_steps(n: int, snapshots: int) -> int:
    """t(n, s): the fewest forward steps that reverse n steps with s snapshots."""
    if n <= 1:
        return 0
    if snapshots < 1:
        raise ValueError("at least one snapshot (the starting point) is needed")
    r = 0
    while comb(snapshots + r, snapshots) < n:
        r += 1
    return r * n - comb(snapshots + r, snapshots + 1)


@lru_cache(maxsize=None)
def split(n: int, free: int) -> int:
    """Where to place the next snapshot when reversing n steps with ``free`` snapshots
    still to place (the held one aside): the m of the optimum."""
    s = free + 1
    return min(range(1, n), key=lambda m: m + forward_steps(n - m, s - 1) + forward_steps(m, s))
