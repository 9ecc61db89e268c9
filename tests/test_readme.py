"""The README stays true: its snippets run as written, and CI runs its set-up commands as
written.

Oracles: the README itself (each ```python block is executed in a fresh namespace);
``.ci/run`` run with a python3 that records what it is asked to do.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_the_snippets() -> None:
    assert len(SNIPPETS) >= 7          # (a), (b), (c), the checker, schedules, custom, learned


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": f"readme_snippet_{index}"}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    assert "solver" in namespace        # every snippet builds a solver and uses it


def readme_commands() -> list[str]:
    """The README's set-up commands: the lines of its first ```bash block."""
    block = re.search(r"^```bash\n(.*?)^```$", README, flags=re.S | re.M)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_commands_are_the_demo_on_the_base_install_and_the_tests() -> None:
    demo, tests = readme_commands()
    assert re.match(r'pip install "torch==[\d.]+" -e \. && python examples/maml_sine\.py\s', demo)
    assert re.match(r'pip install "torch==[\d.]+" -e "\.\[test\]" && python -m pytest\s', tests)


# Stands in for `python3 -m venv DIR`: a "virtual environment" whose pip and python only
# append `$VIRTUAL_ENV tool args...` to $LOG (python fails on $FAIL); a DIR that still
# holds a marker from an earlier run is logged as REUSED.
FAKE_PYTHON3 = r"""#!/usr/bin/env bash
[ "$1 $2" = "-m venv" ] || { echo "unexpected: python3 $*" >> "$LOG"; exit 97; }
dir="$3"
[ -e "$dir/marker" ] && echo "REUSED $dir" >> "$LOG"
mkdir -p "$dir/bin" && touch "$dir/marker"
venv="$(cd "$dir" && pwd)"
printf 'export VIRTUAL_ENV=%q\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n' "$venv" > "$dir/bin/activate"
for tool in pip python; do
    printf '#!/usr/bin/env bash\necho "$VIRTUAL_ENV %s $*" >> "$LOG"\n' "$tool" > "$dir/bin/$tool"
    printf '[ -n "$FAIL" ] && [[ "$*" == *"$FAIL"* ]] && exit 1\nexit 0\n' >> "$dir/bin/$tool"
    chmod +x "$dir/bin/$tool"
done
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("fail", ["", "examples/maml_sine.py"])
def test_ci_runs_each_readme_command_exactly_in_a_fresh_venv(tmp_path: Path, fail: str) -> None:
    """.ci/run, on a copy of the repository's README with a fake python3: each README
    command runs as written (what bash makes of its quoting), in its own new virtual
    environment, one failing does not stop the next, and any failure fails CI."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "log"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    shutil.copy(ROOT / "README.md", repo / "README.md")
    for n in (1, 2):                                   # left over from an earlier run
        (repo / ".ci-venv" / str(n)).mkdir(parents=True)
        (repo / ".ci-venv" / str(n) / "marker").touch()
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON3)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG": str(log),
           "FAIL": fail}
    env.pop("VIRTUAL_ENV", None)
    ci = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert ci.returncode == (1 if fail else 0), ci.stdout + ci.stderr

    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    venvs = sorted({venv for venv, _ in calls})
    assert len(venvs) == 2 and "REUSED" not in venvs      # two, each created afresh
    expected = []
    for venv, command in zip(venvs, readme_commands()):
        words = " ".join(shlex.split(command, comments=True))     # as bash splits and unquotes
        for part in words.split(" && "):
            expected.append([venv, part])
            if fail and fail in part:
                break                                           # `a && b`: b not run
    assert calls == expected


def test_capability_table_matches_the_code() -> None:
    from gimli.optim import capability_table
    begin = README.index("<!-- capability table")
    begin = README.index("\n", begin) + 1
    end = README.index("<!-- end of capability table -->")
    assert README[begin:end].strip() == capability_table()


def test_every_link_leads_to_a_file() -> None:
    links = re.findall(r"\]\(([^)#:]+)\)", README)
    assert len(links) >= 10                         # the examples and notebooks, at least
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def test_every_example_and_notebook_is_linked() -> None:
    scripts = [p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")]
    notebooks = list((ROOT / "notebooks").glob("*.ipynb"))
    unlinked = [p.name for p in scripts + notebooks if f"]({p.relative_to(ROOT)})" not in README]
    assert not unlinked, unlinked

