"""examples/maml_inner_adam.py in quick mode: MAML with an SGD and an Adam inner optimizer
learns on held-out classes, and learns its inner lrs and betas.

Oracle: the example's own final score, the query accuracy on test tasks of held-out
classes after adapting a copy of the model with the real ``torch.optim.SGD`` or
``torch.optim.Adam`` (learned lrs and betas read from the inner optimizer's param
groups), which does not go through gimli.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

from test_examples import load


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load("maml_inner_adam")


def test_maml_inner_adam_quick_learns(example: ModuleType, tmp_path: Path) -> None:
    out = example.main(["--quick", "--out", str(tmp_path)])
    assert set(out) == {"mlp+sgd", "mlp+adam", "cnn+sgd", "cnn+adam"}
    for key, r in out.items():
        opt = key.split("+")[1]
        assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["after"] <= 1.0
        # Meta-training raised post-adaptation accuracy on the held-out classes by a wide
        # margin (3-way chance is 1/3; seeds 0-3 all gain 0.24 or more).
        assert r["after"] > r["before"] + 0.1, key
        # One learned lr per layer, moved from its initial value, finite and positive.
        assert len(r["lr"]) == 3
        for lr in r["lr"]:
            assert math.isfinite(lr) and lr > 0 and lr != pytest.approx(example.INNER_LR[opt])
        if opt == "adam":
            for name, initial in zip(("beta1", "beta2"), example.BETAS):
                assert len(r[name]) == 3
                for beta in r[name]:
                    assert 0.0 <= beta < 1.0 and beta != pytest.approx(initial, abs=1e-6)
        else:
            assert "beta1" not in r
    assert not list(tmp_path.iterdir())              # quick mode draws no figure


def test_maml_inner_adam_plot(example: ModuleType, tmp_path: Path) -> None:
    """The full run's figure, drawn from a short made-up history."""
    sgd = [{"lr": [0.1, 0.1, 0.1]}, {"lr": [0.2, 0.15, 0.1]}]
    adam = [{"lr": [1e-3] * 3, "beta1": [0.9] * 3, "beta2": [0.999] * 3},
            {"lr": [2e-3] * 3, "beta1": [0.8] * 3, "beta2": [0.9999] * 3}]
    path = example.plot({"mlp+sgd": sgd, "mlp+adam": adam, "cnn+sgd": sgd}, tmp_path)
    assert path.parent == tmp_path and path.suffix == ".png" and path.stat().st_size > 0
