"""The library's type annotations are checked (house style, rule 9).

Oracle: mypy, configured in pyproject.toml ([tool.mypy]), over gimli/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_gimli() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the [test] extra")
    run = subprocess.run([sys.executable, "-m", "mypy", "gimli"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
