"""Sphinx configuration of gimli's documentation: the guide (``docs/guide/``, markdown)
and the API reference (``docs/api.rst``), one site.

Built by ``tests/test_docs.py`` with warnings as errors and every cross-reference
checked (nitpicky): a public name without its docstring's targets fails the tests.
References to torch's and Python's own types are not resolved (no inventory is fetched:
the build needs no network) and are ignored by name below.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "gimli"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_heading_anchors = 3            # links to a page's #a-heading, as GitHub renders them
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(torch|collections\.abc|typing|types)\..*"),
    ("py:class", r"(Tensor|nn\.Module|Path|Any)"),
    ("py:class", r"gimli\._\w+\.\w+"),          # a private module's type in an annotation
]
# The guide links to the repository's other documents (the README, proofs/, the design
# document) as GitHub shows them; the built pages show their names. Only files that
# exist are let through: a link to a missing one still fails the build.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _outside_documents() -> list[str]:
    """The repository's markdown files outside the guide, as myst names a link's target
    (the path without ``.md``); hidden folders and build outputs are not walked."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_build")) and d != "guide"]
        found += [os.path.join(folder, name)[:-3] for name in files if name.endswith(".md")]
    return found


nitpick_ignore = [("myst", path) for path in _outside_documents()] + [("myst", "design")]
html_theme = "alabaster"
exclude_patterns = ["_build", "api/_build", "design.md", "figures"]


class CapabilityTable(Directive):
    """``.. gimli-capabilities::``: the table of what each optimizer can meta-learn, read
    from ``gimli.optim.capabilities()`` when the docs are built."""

    def run(self) -> list[Any]:
        from gimli.optim import GRANULARITY_LETTERS, capabilities

        table = nodes.table()
        group = nodes.tgroup(cols=2)
        table += group
        for _ in range(2):
            group += nodes.colspec(colwidth=1)
        head = nodes.thead()
        group += head
        body = nodes.tbody()
        group += body

        def row(cells: list[str], into: Any) -> None:
            line = nodes.row()
            for text in cells:
                entry = nodes.entry()
                entry += nodes.paragraph(text=text)
                line += entry
            into += line

        row(["optimizer", "learnable hyperparameters and granularities"], head)
        for name, hypers in capabilities().items():
            row([name, " · ".join(f"{h} {''.join(GRANULARITY_LETTERS[g] for g in per)}"
                                  for h, per in hypers.items())], body)
        return [table]


def setup(app: Any) -> None:
    app.add_directive("gimli-capabilities", CapabilityTable)
