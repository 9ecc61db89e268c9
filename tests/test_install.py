"""What the base install gives: the README's first command installs gimli with
``pip install -e .`` alone, and the main demo, ``gimli demo`` and ``import gimli`` must
work, quietly, with exactly that.

Oracle: the distributions that install brings, read from ``pyproject.toml``'s
dependencies and, recursively, their installed metadata (no extras). Each check runs
in a fresh interpreter in which every other installed package (tqdm, matplotlib,
scikit-learn, pytest, ...) cannot be imported. ``.ci/run`` does the same for real, in a
fresh virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run in the fresh interpreter: hide the top-level modules named in $BLOCKED, then run
# argv[1:] as `python ARGS` would (a script, -m module or -c code).
DRIVER = r"""
import json, os, runpy, sys
from importlib.machinery import PathFinder

BLOCKED = frozenset(json.loads(os.environ["BLOCKED"]))

class NotInstalled(PathFinder):
    # sys.path's finder, blind to the blocked modules: `import tqdm` fails and
    # importlib.util.find_spec("tqdm") is None, as where tqdm is not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)

for name in [n for n in sys.modules if n.partition(".")[0] in BLOCKED]:
    del sys.modules[name]
sys.meta_path[:] = [NotInstalled if f is PathFinder else f for f in sys.meta_path]
args = sys.argv[1:]
if args[0] == "-c":
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
elif args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
    runpy.run_path(args[0], run_name="__main__")
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_install() -> set[str]:
    """The distributions `pip install -e .` installs: gimli, its dependencies in
    pyproject.toml, theirs, and so on (markers evaluated, no extras), plus the
    virtual environment's own pip and setuptools."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = {"gimli", "pip", "setuptools"}
    todo = list(declared)
    while todo:
        req = requirements.Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _canonical(req.name)
        if name in found:
            continue
        found.add(name)
        try:
            todo.extend(metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            pass                        # not installed here: nothing of it to block either
    return found


def blocked() -> list[str]:
    """Top-level modules of installed distributions that the base install does not bring."""
    allowed = base_install()
    return sorted(top for top, dists in metadata.packages_distributions().items()
                  if not any(_canonical(d) in allowed for d in dists)
                  and top not in sys.stdlib_module_names)


def run_on_base_install(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BLOCKED": json.dumps(blocked())}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_base_install_lacks_the_extras() -> None:
    """The check's own premise: the extras are what it blocks, torch and numpy are not."""
    names = blocked()
    assert {"tqdm", "matplotlib", "sklearn", "pytest"} <= set(names)
    assert not {"torch", "numpy", "opt_einsum", "gimli"} & set(names)


def test_import_gimli_prints_nothing() -> None:
    """torch prints "Failed to initialize NumPy" where numpy is missing: gimli depends on it."""
    out = run_on_base_install("-c", "import gimli, torch; torch.zeros(2).numpy()")
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout == ""


@pytest.mark.parametrize("command", [
    ["examples/maml_sine.py", "--quick"],
    ["-m", "gimli", "demo", "--quick", "--iterations", "4"],
], ids=["script", "gimli demo"])
def test_main_demo_runs_on_the_base_install(command: list[str], tmp_path: Path) -> None:
    out = run_on_base_install(*command, "--out", str(tmp_path / "maml_sine.png"))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""                             # no warning, no traceback
    assert "lower is better" in out.stdout
    assert "meta-training: 4/" in out.stdout           # progress as plain lines, without tqdm
    assert "no figure: matplotlib is not installed (pip install matplotlib" in out.stdout
    assert not list(tmp_path.iterdir())


def test_every_example_imports_on_the_base_install() -> None:
    """Each example imports with the base install (the digits examples ask for
    scikit-learn only when they load the digits): tqdm and matplotlib are optional."""
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    code = ("import importlib.util, sys\n"
            "sys.path.insert(0, 'examples')\n"
            f"for name in {scripts!r}:\n"
            "    spec = importlib.util.spec_from_file_location(name[:-3], 'examples/' + name)\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print('imported')\n")
    out = run_on_base_install("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout.startswith("imported")
