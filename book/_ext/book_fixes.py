"""Small Sphinx fixes for the Jupyter Book 1 build of "Differentiable ICP".

sphinx-thebe 0.3 registers its inline configuration script (``const THEBE_JS_URL = ...``) both
with the application and with the already-initialised HTML builder under Sphinx 7.4, so every page
declared the constant twice and browsers logged "Identifier 'THEBE_JS_URL' has already been
declared" (sphinx-togglebutton's selector is repeated the same way). This extension drops
repeated script entries (same file, same inline body) from each page's context.

It also serves MathJax from the book itself when a copy lies in ``book/_static/mathjax/``
(``scripts/setup.sh`` fetches MathJax 3 there from the npm registry; the folder is not committed),
so the built HTML typesets its equations offline. Without the copy the default CDN is used.
"""

from pathlib import Path

LOCAL_MATHJAX = Path(__file__).resolve().parents[1] / "_static" / "mathjax" / "tex-chtml.js"


def _local_mathjax(app, config):
    if LOCAL_MATHJAX.exists():
        config.mathjax_path = "mathjax/tex-chtml.js"


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        attributes = dict(getattr(script, "attributes", {}))
        key = (getattr(script, "filename", str(script)) or "", attributes.get("body"))
        if key in seen:
            continue
        seen.add(key)
        unique.append(script)
    scripts[:] = unique


def setup(app):
    app.connect("config-inited", _local_mathjax)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
