"""Sphinx configuration of the torchupdates documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import torchupdates

project = "torchupdates"
author = "torchupdates contributors"
copyright = "torchupdates contributors, MIT License"
version = release = torchupdates.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: "## Norm constraints" gets the anchor #norm-constraints, as on GitHub, and
# $...$ / $$...$$ is math (rendered by MathJax, like the docstrings' :math: roles).
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# API pages: signatures as written, members in source order, no inherited torch methods.
# \text{max\_norm} in the docstrings' formulas needs MathJax's textmacros package.
mathjax3_config = {
    "loader": {"load": ["[tex]/textmacros"]},
    "tex": {"packages": {"[+]": ["textmacros"]}},
}

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

html_theme = "alabaster"
html_title = f"torchupdates {release}"
html_static_path: list[str] = []
