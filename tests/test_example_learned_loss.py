"""examples/learned_loss.py in quick mode: a meta-learned loss trains better than the
loss network it started from.

Oracle: the example's own final score, the MSE on clean held-out points of test tasks
after training fresh models (the same initial weights for every loss) with the real
``torch.optim.SGD`` on each loss, which does not go through gimli.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from test_examples import load


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load("learned_loss")


def test_learned_loss_quick_learns(example: ModuleType, tmp_path: Path) -> None:
    out = example.main(["--quick", "--out", str(tmp_path)])
    assert all(math.isfinite(out[k]) for k in ("untrained", "initial", "learned", "mse"))
    assert out["learned"] < out["initial"]          # meta-training improved the loss …
    assert out["learned"] < 0.7 * out["untrained"]  # … into one that trains the model
    # With 30 % corrupted training labels the learned loss also beats training on MSE
    # itself (quick runs, seeds 0-3: 0.15-0.17 against 0.23).
    assert out["learned"] < out["mse"]
    assert not list(tmp_path.iterdir())             # quick mode draws no figure


def test_learned_loss_plot(example: ModuleType, tmp_path: Path) -> None:
    """The full run's figure, drawn from short made-up curves."""
    torch.manual_seed(0)
    curves = {"initial ℓ_φ": [0.3, 0.5, 0.6], "learned ℓ_φ": [0.3, 0.2, 0.15],
              "true loss (MSE)": [0.3, 0.25, 0.2]}
    path = example.plot(curves, example.build_loss_net(), example.build_loss_net(), 1, tmp_path)
    assert path.parent == tmp_path and path.suffix == ".png" and path.stat().st_size > 0
