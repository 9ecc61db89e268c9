"""The API reference (``docs/api/``) builds from the code without a warning, every
cross-reference resolved; and a broken reference does fail it.

Oracle: Sphinx itself, run with warnings as errors (``-W``) and every reference checked
(``-n``), as CI runs it through this test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"


def build(source: Path, out: Path) -> int:
    from sphinx.cmd.build import build_main
    return build_main(["-q", "-n", "-W", "-E", "-b", "html", str(source), str(out)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # Sphinx's own, importing its parts
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_api_reference_builds_without_a_warning(tmp_path: Path) -> None:
    assert build(API, tmp_path / "html") == 0
    page = (tmp_path / "html" / "index.html").read_text()
    for name in ("GimliSolver", "MetaParams", "ClipGradNorm", "Hypergradients", "register_optimizer"):
        assert f'id="gimli.{name}"' in page, name
    assert "Adafactor" in page                                  # the capability table, from the code


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_a_broken_reference_fails_the_build(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(API / "conf.py", source / "conf.py")
    (source / "index.rst").write_text("Broken\n======\n\nSee :class:`gimli.NoSuchClass`.\n")
    assert build(source, tmp_path / "html") != 0
