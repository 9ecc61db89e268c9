"""The documentation (``docs/``: the guide's pages and the API reference) builds from the
code without a warning, every cross-reference resolved; and a broken reference, in the API
reference or a guide page, does fail it.

Oracle: Sphinx itself, run with warnings as errors (``-W``) and every reference checked
(``-n``), as CI runs it through this test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def build(source: Path, out: Path) -> int:
    from sphinx.cmd.build import build_main
    return build_main(["-q", "-n", "-W", "-E", "-b", "html", str(source), str(out)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # Sphinx's own, importing its parts
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_docs_build_without_a_warning(tmp_path: Path) -> None:
    assert build(DOCS, tmp_path / "html") == 0
    page = (tmp_path / "html" / "api.html").read_text()
    for name in ("GimliSolver", "MetaParams", "ClipGradNorm", "Hypergradients", "register_optimizer"):
        assert f'id="gimli.{name}"' in page, name
    assert "Adafactor" in page                                  # the capability table, from the code
    index = (tmp_path / "html" / "index.html").read_text()
    for guide in sorted((DOCS / "guide").glob("*.md")):         # every page of the guide, linked
        assert f'href="guide/{guide.stem}.html"' in index, guide.name
    assert "Several optimizers" in (tmp_path / "html" / "guide" / "what-can-be-learned.html").read_text()
    examples = (tmp_path / "html" / "guide" / "examples.html").read_text()    # a link to a section
    assert 'href="what-can-be-learned.html#per-example-weights-data-reweighting"' in examples


BROKEN = {   # a site of this configuration with one broken reference: its files
    "an API name": {"index.rst": "Broken\n======\n\nSee :class:`gimli.NoSuchClass`.\n"},
    "a guide link": {"index.rst": "Index\n=====\n\n.. toctree::\n\n   page\n",
                     "page" + ".md": "# Page\n\nSee [the other page](no-such-page" + ".md).\n"},
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_reference_fails_the_build(tmp_path: Path, broken: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(DOCS / "conf.py", source / "conf.py")
    for name, text in BROKEN[broken].items():
        (source / name).write_text(text)
    assert build(source, tmp_path / "html") != 0
