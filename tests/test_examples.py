"""The examples run in quick mode and actually learn, on one thread, and write where git
does not track.

Oracle: each example's own final score, the query MSE after adapting a copy of the
model with the real ``torch.optim.SGD``, which does not go through gimli; for the
outputs, ``git check-ignore`` and ``git status``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLES_WITH_MAIN = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


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


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


needs_git = pytest.mark.skipif(shutil.which("git") is None or git("rev-parse").returncode != 0,
                               reason="not a git checkout")


def ignored(path: Path) -> bool:
    """Whether git ignores this path (a tracked file is not ignored)."""
    return git("check-ignore", "-q", str(path)).returncode == 0


@needs_git
def test_maml_sine_quick_learns(maml_sine: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """With its defaults: it learns, says so in plain words, runs on one thread, and
    leaves the checkout as it was (the figure goes to a folder git ignores)."""
    threads, seen = torch.get_num_threads(), []
    step = maml_sine.meta_step

    def spy(*args: Any) -> float:
        seen.append(torch.get_num_threads())
        return float(step(*args))

    monkeypatch.setattr(maml_sine, "meta_step", spy)
    tracked = git("status", "--porcelain", "--", "examples", "docs").stdout
    out = maml_sine.main(["--quick"])
    assert math.isfinite(out["before"]) and math.isfinite(out["after"])
    assert out["after"] < out["before"]              # meta-training improved post-adaptation MSE
    assert out["lrs"] == [maml_sine.INNER_LR] * 3    # without --learn-lr the lrs stay put
    assert set(seen) == {1} and torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "(lower is better)" in printed
    assert f"before meta-training {out['before']:.2f}" in printed
    assert f"after meta-training  {out['after']:.2f}" in printed

    figure = out["figure"]
    assert figure == maml_sine.OUTPUT / "maml_sine.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and ignored(figure)
    assert git("status", "--porcelain", "--", "examples", "docs").stdout == tracked


@needs_git
@pytest.mark.parametrize("name", EXAMPLES_WITH_MAIN)
def test_default_outputs_are_git_ignored(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path an example writes by default (its --out, a file or a folder) is one
    git ignores, so running it cannot overwrite a committed file."""

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def defaults(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(parse(self, []))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", defaults)
    with pytest.raises(Parsed) as parsed:
        load(name).main([])
    paths = [p for p in vars(parsed.value.args[0]).values() if isinstance(p, Path)]
    for path in paths:
        probe = path if path.suffix else path / "figure.png"     # a folder: what it will hold
        assert ignored(probe), f"{name}'s default output {path} is not ignored by git"
    assert paths or name == "distributed_maml"                    # it writes nothing


def test_maml_sine_default_run_is_short(maml_sine: ModuleType) -> None:
    """The default run must finish in well under 2 minutes on a shared 2-core machine:
    its meta-training is capped at 6,400 task unrolls (800 × 8 measured 26 CPU-seconds
    here, one thread); the long run is behind --full. (Counts, not times: tests assert
    no timings.)"""
    default, full = maml_sine.BUDGETS["default"], maml_sine.BUDGETS["full"]
    assert default.iterations * default.meta_batch <= 6400
    assert full.iterations * full.meta_batch > 2 * default.iterations * default.meta_batch


def test_maml_sine_figure_tasks_span_the_amplitudes(maml_sine: ModuleType) -> None:
    """The figure's tasks sit at the 10th, 50th and 90th amplitude percentile of the new
    tasks (not three that happen to be first), whatever the tasks."""
    for seed in (maml_sine.TEST_SEED, 7):
        tasks = [maml_sine.sample_task(torch.Generator().manual_seed(seed + i)) for i in range(50)]
        amplitudes = [maml_sine.amplitude(t) for t in tasks]
        order = sorted(range(len(tasks)), key=amplitudes.__getitem__)
        ranks = [order.index(i) / (len(tasks) - 1) for i in maml_sine.representative(tasks)]
        assert ranks == pytest.approx([0.1, 0.5, 0.9], abs=0.03)


def test_maml_sine_quick_learns_lrs(maml_sine: ModuleType, tmp_path: Path) -> None:
    out = maml_sine.main(["--quick", "--learn-lr", "--out", str(tmp_path / "maml_sine.png")])
    assert math.isfinite(out["before"]) and math.isfinite(out["after"])
    assert len(out["lrs"]) == 3                      # one inner lr per layer
    assert all(math.isfinite(lr) and lr != pytest.approx(maml_sine.INNER_LR) for lr in out["lrs"])
