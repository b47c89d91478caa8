"""Sphinx configuration for the pyro_vae API reference (``make docs``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro_vae"
author = "pyro_vae authors"
copyright = "pyro_vae authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# DESIGN.md and img/ are linked from the README, not part of this build.
exclude_patterns = ["_build", "DESIGN.md", "img"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
nitpicky = False

html_theme = "alabaster"
html_title = "pyro_vae API reference"


def _resolve_reexport(app, env, node, contnode):
    """Point ``pyro_vae.VAE``, ``pyro_vae.fit``, bare ``InputError`` ... at the module that defines them.

    The docstrings name objects by the package's re-exports (``pyro_vae.X``) or
    by a bare name the module imports; the reference documents each object once,
    in its own module.
    """
    import pyro_vae

    if node.get("refdomain") != "py":
        return None
    parts = node["reftarget"].split(".")
    if parts[0] == "pyro_vae":
        parts = parts[1:]
    if not parts:
        return None
    obj = getattr(pyro_vae, parts[0], None)
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and module.startswith("pyro_vae.") and qualname):
        return None
    target = ".".join([module, qualname] + parts[1:])
    return env.domains["py"].resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target, node, contnode)


def _check_every_module_has_a_page(app):
    """Warn (an error under ``-W``) for a module of pyro_vae/ without its page docs/api/<module>.rst."""
    from pathlib import Path

    from sphinx.util import logging

    root = Path(app.srcdir)
    modules = {p.stem for p in (root.parent / "pyro_vae").glob("*.py") if not p.stem.startswith("_")}
    pages = {p.stem for p in (root / "api").glob("*.rst")}
    for name in sorted(modules - pages):
        logging.getLogger(__name__).warning(
            "pyro_vae/%s.py has no page: add docs/api/%s.rst (an automodule of pyro_vae.%s) "
            "and list it in a toctree of docs/index.rst", name, name, name)


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
    app.connect("builder-inited", _check_every_module_has_a_page)
