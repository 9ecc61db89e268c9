"""examples/hyper_l2.py runs in quick mode and its meta-learned weight decay helps.

Oracle: the example's own independent scores, cross-entropy on a validation split and on
a test split computed with plain torch after training with the real ``torch.optim.SGD``,
compared between the run whose per-layer L2 coefficients gimli meta-learned and the same
training (same initial weights, same minibatches) with the coefficients frozen at their
initial value.
"""

from __future__ import annotations

import math
from pathlib import Path

from test_examples import load


def test_hyper_l2_quick_learns(tmp_path: Path) -> None:
    out = load("hyper_l2").main(["--quick", "--out", str(tmp_path)])

    assert len(out["figures"]) == 2
    for figure in out["figures"]:
        assert Path(figure).parent == tmp_path and Path(figure).stat().st_size > 0

    numbers = [*out["coefficients"], *out["test_loss"].values(), *out["test_accuracy"].values(),
               *out["val_loss"].values()]
    assert all(math.isfinite(x) for x in numbers)

    # one coefficient per layer of the 64-128-128-10 MLP, each moved well away from the start
    assert len(out["coefficients"]) == 3
    assert all(abs(math.log(c / out["initial_coefficient"])) > 1.0 for c in out["coefficients"])

    # the meta-objective went down: lower validation cross-entropy than the frozen coefficients
    assert out["val_loss"]["meta"] < out["val_loss"]["fixed"]
    # and it generalizes to data meta-training never saw
    assert out["test_loss"]["meta"] < out["test_loss"]["fixed"]
