"""The README, the guide and the project's documents stay true: their snippets run as
written, CI runs the README's set-up commands as written, and every document a file points
to is in the repository (the design document's sections and every markdown link included).

Oracles: the README and the guide's pages themselves (each ```python block is executed in a
fresh namespace);
``.ci/run`` run with a python3 that records what it is asked to do; the repository's
own files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DESIGN = ROOT / "docs/design.md"
GUIDE = sorted((ROOT / "docs" / "guide").glob("*.md"))
# (document, index in it, code) for every ```python block of the README and the guide
SNIPPETS = [(path.relative_to(ROOT).as_posix(), k, code) for path in [ROOT / "README.md", *GUIDE]
            for k, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


def test_readme_has_the_snippets() -> None:
    # the README's first example; (a), (b), (c), the checker, schedules, custom, learned,
    # several optimizers in the guide
    assert sum(doc == "README.md" for doc, _, _ in SNIPPETS) == 1
    assert len(SNIPPETS) >= 9


def test_readme_fits_one_screen() -> None:
    """The README is a start and links: the long sections live in the guide."""
    assert len(README.splitlines()) <= 80
    for page in GUIDE:
        assert f"](docs/guide/{page.name})" in README, page.name


@pytest.mark.parametrize("doc,index,code", SNIPPETS, ids=[f"{d}:{k}" for d, k, _ in SNIPPETS])
def test_readme_snippet_runs(doc: str, index: int, code: str, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": f"snippet_{index}"}
    exec(compile(code, f"{doc} snippet {index}", "exec"), namespace)
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


def test_ci_names_the_readme_commands_as_written() -> None:
    """.ci/run spells out the demo and the test command; they are the README's lines."""
    script = (ROOT / ".ci" / "run").read_text()
    listed = re.search(r"^commands=\(\n(.*?)^\)$", script, flags=re.S | re.M)
    assert listed is not None
    assert [shlex.split(line)[0] for line in listed.group(1).splitlines()] == readme_commands()
    assert "examples/maml_sine.py" in script and "python -m pytest" in script


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
    """.ci/run with a fake python3: each README command runs as written (what bash makes
    of its quoting), in its own new virtual environment, one failing does not stop the
    next, and any failure fails CI."""
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
    page = (ROOT / "docs/guide/what-can-be-learned.md").read_text()
    begin = page.index("<!-- capability table")
    begin = page.index("\n", begin) + 1
    end = page.index("<!-- end of capability table -->")
    assert page[begin:end].strip() == capability_table()


def test_every_link_leads_to_a_file() -> None:
    links = [(path.parent / link) for path in [ROOT / "README.md", *GUIDE]
             for link in re.findall(r"\]\(([^)#:]+)\)", path.read_text())]
    assert len(links) >= 20                         # the guide, examples and notebooks, at least
    missing = [str(link) for link in links if not link.exists()]
    assert not missing, missing


def test_every_example_and_notebook_is_linked() -> None:
    page = (ROOT / "docs/guide/examples.md").read_text()
    scripts = [p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")]
    notebooks = list((ROOT / "notebooks").glob("*.ipynb"))
    unlinked = [p.name for p in scripts + notebooks if f"](../../{p.relative_to(ROOT)})" not in page]
    assert not unlinked, unlinked


def project_files() -> list[Path]:
    """The repository's text files: tracked, or new and not ignored (else every file
    outside hidden folders and the virtual environment)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True) if shutil.which("git") else None
    if listed is not None and listed.returncode == 0:
        paths = [ROOT / name for name in listed.stdout.splitlines()]
    else:
        paths = [p for p in ROOT.rglob("*") if not any(part.startswith(".") for part in
                                                        p.relative_to(ROOT).parts)]
    texts = []
    for path in paths:
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue                                            # images, folders, deleted files
        texts.append(path)
    return texts


def markdown(path: Path) -> str:
    """A document's markdown: the file, or a notebook's markdown cells."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped,
    spaces to hyphens."""
    headings = re.findall(r"^#+ (.*?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_cited_document_is_in_the_repository() -> None:
    """A file that names a document (``proofs/adam.md``, ``README.md``, a design
    document) names one that exists, next to it or from the repository root."""
    missing = []
    for path in project_files():
        for name in set(re.findall(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)\b", path.read_text())):
            if not ((path.parent / name).exists() or (ROOT / name).exists()):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_design_sections_cited_exist() -> None:
    """Every ``docs/design.md §N`` names a numbered section of the design document."""
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M))
    assert {"2", "3", "5"} <= sections          # the sweep, the guards, the ladder
    cited = {(path.relative_to(ROOT), n) for path in project_files()
             for n in re.findall(r"design\.md`?\]?\s*§\s*(\d+)", path.read_text())}
    assert len(cited) >= 10
    wrong = [f"{path}: §{n}" for path, n in cited if n not in sections]
    assert not wrong, wrong


def test_every_markdown_link_resolves() -> None:
    """In every markdown file and notebook: a relative link leads to a file, and an
    anchor into a markdown file to one of its headings."""
    broken = []
    documents = [p for p in project_files() if p.suffix in (".md", ".ipynb")]
    assert DESIGN in documents
    for path in documents:
        text = re.sub(r"```.*?```", "", markdown(path), flags=re.S)   # not inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                                               # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists() or ROOT not in dest.parents:
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
