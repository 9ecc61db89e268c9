"""The examples run in quick mode and actually learn.

Oracle: each example's own final score, the query MSE after adapting a copy of the
model with the real ``torch.optim.SGD``, which does not go through gimli.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    """Import examples/<name>.py by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def maml_sine() -> ModuleType:
    return load("maml_sine")


def test_maml_sine_quick_learns(maml_sine: ModuleType, tmp_path: Path) -> None:
    out = maml_sine.main(["--quick", "--out", str(tmp_path / "maml_sine.png")])
    assert math.isfinite(out["before"]) and math.isfinite(out["after"])
    assert out["after"] < out["before"]              # meta-training improved post-adaptation MSE
    assert out["lrs"] == [maml_sine.INNER_LR] * 3    # without --learn-lr the lrs stay put
    assert (tmp_path / "maml_sine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maml_sine_quick_learns_lrs(maml_sine: ModuleType, tmp_path: Path) -> None:
    out = maml_sine.main(["--quick", "--learn-lr", "--out", str(tmp_path / "maml_sine.png")])
    assert math.isfinite(out["before"]) and math.isfinite(out["after"])
    assert len(out["lrs"]) == 3                      # one inner lr per layer
    assert all(math.isfinite(lr) and lr != pytest.approx(maml_sine.INNER_LR) for lr in out["lrs"])
