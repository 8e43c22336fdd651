"""Sphinx configuration for pytest-procsafe's documentation."""

from __future__ import annotations

import pytest_procsafe

project = "pytest-procsafe"
author = "pytest-procsafe contributors"
copyright = "pytest-procsafe contributors"
release = pytest_procsafe.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
# Types read best in the signature; the classes are built by the fixtures, so their
# constructor signatures would only mislead.
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
autodoc_default_options = {"undoc-members": False, "exclude-members": "__init__, __new__"}

# No network on the build machines: cross-references to other projects are plain text.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = "furo"
html_title = f"pytest-procsafe {release}"
