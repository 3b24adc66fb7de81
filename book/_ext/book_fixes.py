"""Small Sphinx fixes for the Jupyter Book 1 build of "Differentiable ICP".

sphinx-thebe 0.3 registers its inline configuration script (``const THEBE_JS_URL = ...``) both
with the application and with the already-initialised HTML builder under Sphinx 7.4, so every page
declared the constant twice and browsers logged "Identifier 'THEBE_JS_URL' has already been
declared" (sphinx-togglebutton's selector is repeated the same way). This extension drops
repeated script entries (same file, same inline body) from each page's context.

It also serves MathJax from the book itself when a copy lies in ``book/_static/mathjax/``
(``scripts/setup.sh`` fetches MathJax 3 there from the npm registry; the folder is not committed),
so the built HTML typesets its equations offline. Without the copy the default CDN is used.

And it serves plotly.js once for the whole site: the chapters are executed for the book with
``DIFFCP_PLOTLYJS=site`` (``diffcp.viz.show_plotly`` then does not embed the 4.8 MB library in every
notebook), the build copies ``plotly.min.js`` from the installed plotly package into ``_static``,
and only the pages that hold a plotly figure load it. Offline, like the rest of the site.

Finally it makes the pages fit the screen (``_static/fit.css`` and ``_static/fit.js``, on every
page): code and text outputs wrap their long lines at desktop width, tables and display equations
fit a phone. For readable wrapped code, every line of a highlighted block is put in a
``<span class="line" style="--indent: N">`` (N: the line's leading spaces), so that the CSS can
continue a wrapped line 4 columns right of where it starts. The text of the blocks is unchanged
(copy buttons and Thebe read the same code).
"""

import html
import re
import shutil
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


def _plotly_source() -> Path:
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def _copy_plotly(app, exception):
    if exception is None and app.builder.format == "html":
        shutil.copyfile(_plotly_source(), Path(app.outdir) / "_static" / "plotly.min.js")


def _plotly_pages(app, pagename, templatename, context, doctree):
    if "plotly-graph-div" in context.get("body", "") and "script_files" in context:
        context["script_files"].insert(0, "_static/plotly.min.js")


_HIGHLIGHTED = re.compile(r'(<div class="highlight"><pre>)(.*?)(</pre></div>)', re.S)
_TAG = re.compile(r"<[^>]*>")


def _line_spans(block: str) -> str:
    """Wrap each line of one Pygments ``<pre>`` body in a span that carries its indentation.
    Pygments closes its token spans at the end of every line; a block where that does not hold is
    returned unchanged."""
    lines = block.split("\n")
    if any(line.count("<span") != line.count("</span>") for line in lines):
        return block
    out = []
    for line in lines:
        text = html.unescape(_TAG.sub("", line))
        if not text.strip():
            out.append(line)
            continue
        indent = len(text) - len(text.lstrip(" "))
        out.append(f'<span class="line" style="--indent: {indent}">{line}</span>')
    return "\n".join(out)


def _wrap_code_lines(app, pagename, templatename, context, doctree):
    body = context.get("body")
    if body and '<div class="highlight"><pre>' in body:
        context["body"] = _HIGHLIGHTED.sub(lambda m: m.group(1) + _line_spans(m.group(2)) + m.group(3), body)


def setup(app):
    app.add_css_file("fit.css")
    app.add_js_file("fit.js")
    app.connect("html-page-context", _wrap_code_lines)
    app.connect("config-inited", _local_mathjax)
    app.connect("html-page-context", _plotly_pages, priority=800)
    app.connect("build-finished", _copy_plotly)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
