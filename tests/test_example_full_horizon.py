"""examples/full_horizon.py runs in quick mode, learns, and meta-learns its lrs both ways.

Oracle: the example's own score, test accuracy on the held-out 20 % of the digits,
computed with plain torch; the figure is checked as a PNG file. That the full-horizon
hypergradient is the one of the whole run is tests/test_forward.py's
(test_full_horizon_equals_one_long_unroll).
"""

from __future__ import annotations

import math
from pathlib import Path

from test_examples import load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANCE = 0.1                    # ten balanced classes


def test_full_horizon_quick(tmp_path: Path) -> None:
    example = load("full_horizon")
    out = example.main(["--quick", "--out", str(tmp_path)])
    data = (tmp_path / "full_horizon.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    (run,) = out["runs"]                                    # one seed in quick mode
    for key in ("fixed", "truncated", "full"):
        acc = run["accuracy"][key]
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in acc)
        assert acc[-1] > CHANCE + 0.2, (key, acc)           # it learned
    for key in ("truncated", "full"):
        lrs = run["lrs"][key]                               # one row per window, one lr per layer
        assert len(lrs) >= 2 and all(len(row) == 4 for row in lrs)
        assert all(math.isfinite(lr) and lr > 0 for row in lrs for lr in row)
        assert all(abs(lr - out["initial_lr"]) > 1e-4 for lr in lrs[-1])    # each lr moved
    # the two online runs see the same first window from the same point: the same first
    # hypergradient (no past yet), so the same first lrs; they part afterwards
    first = [run["lrs"][key][0] for key in ("truncated", "full")]
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(*first))
    assert any(abs(a - b) > 1e-6 * abs(a) for a, b in zip(run["lrs"]["truncated"][-1], run["lrs"]["full"][-1]))
