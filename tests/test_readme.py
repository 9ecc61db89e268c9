"""The README stays true: its snippets run as written, and CI runs its test command.

Oracle: the README itself (each ```python block is executed in a fresh namespace).
"""

from __future__ import annotations

import re
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


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"^(pip install .*?)\s*(?:#.*)?$", README, flags=re.M)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


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
