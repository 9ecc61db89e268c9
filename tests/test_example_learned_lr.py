"""examples/learned_lr.py runs in quick mode, learns, and meta-learns its lrs.

Oracle: the example's own score, test accuracy on the held-out 20 % of the digits,
computed with plain torch after training with the real ``torch.optim.SGD`` (gimli only
chooses the meta-learned run's lrs); the figures are checked as PNG files.
"""

from __future__ import annotations

import math
from pathlib import Path

from test_examples import load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANCE = 0.1                    # ten balanced classes


def test_learned_lr_quick(tmp_path: Path) -> None:
    example = load("learned_lr")
    out = example.main(["--quick", "--out", str(tmp_path)])

    for name in ("learned_lr_accuracy.png", "learned_lr_lrs.png"):   # Figures 1 and 2
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    runs = ("fixed", "schedule", "meta")
    epochs = len(out["accuracy"]["fixed"])
    assert epochs >= 2
    for run in runs:
        acc = out["accuracy"][run]
        assert len(acc) == epochs
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in acc)
        assert out["final"][run] == acc[-1]
        assert out["final"][run] > CHANCE + 0.3, (run, acc)           # it learned

    lrs = out["lrs"]                         # per epoch, one lr per layer
    assert len(lrs) == epochs and all(len(row) == len(out["layers"]) == 4 for row in lrs)
    assert all(math.isfinite(lr) and lr > 0 for row in lrs for lr in row)
    assert all(abs(lr - out["initial_lr"]) > 1e-4 for lr in lrs[-1])  # each lr moved
    assert out["clamped"] == 0               # the meta-lr keeps them positive unaided
