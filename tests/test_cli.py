"""The ``gimli`` command line: ``check`` runs the verification zoo against the full
autograd unroll (the oracle, ``gimli/_oracle.py``) and fails when a hypergradient is
wrong; ``demo`` runs the main demo; ``--help`` on each."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gimli
import gimli._check as check
from gimli._cli import main


def test_check_passes_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--optimizers", "SGD,Adam amsgrad", "--granularities", "group,element",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 cases" in out and out.rstrip().endswith("PASS")
    rows = [line for line in out.splitlines() if line.startswith(("SGD", "Adam"))]
    assert len(rows) == 4 and all(" pass " in r for r in rows)


def test_check_fails_on_a_wrong_hypergradient(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A corrupted sweep (the SGD lr cotangent doubled) must make the zoo fail."""
    from gimli.optim import sgd
    from setups import corrupt_lr

    corrupt_lr(monkeypatch, sgd, 2.0)
    assert main(["check", "--optimizers", "SGD", "--granularities", "tensor", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0 of 1 cases" in out


def test_check_covers_every_builtin_optimizer() -> None:
    names = {name.split()[0] for name in check.ZOO}
    assert names == set(gimli.optim.capabilities())


def test_bad_arguments() -> None:
    assert main(["check", "--optimizers", "Nope"]) == 2
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.mark.parametrize("command", [[], ["check"]])
def test_help(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "gimli", *command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(" ".join(["usage: gimli", *command]))


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--", "--help"]])
def test_demo_help_is_the_demos_own(args: list[str]) -> None:
    """`gimli demo --help` (and `-- --help`) shows the demo's usage and flags, not gimli's."""
    out = subprocess.run([sys.executable, "-m", "gimli", "demo", *args],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: gimli demo ")
    for flag in ("--quick", "--full", "--iterations", "--steps", "--learn-lr", "--out"):
        assert flag in out


def test_demo_passes_bad_arguments_to_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--no-such-flag"])
    assert "usage: gimli demo" in capsys.readouterr().err


def test_demo_runs_the_maml_example(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    assert main(["demo", "--quick", "--iterations", "3", "--out", f"{tmp_path}/demo.png"]) == 0
    out = capsys.readouterr().out
    assert "Mean squared error on 100 new sine tasks" in out and "(lower is better)" in out
