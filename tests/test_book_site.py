"""Checks of the book's machinery: configuration, table of contents, plotting helpers and, in a
headless Chromium, the built HTML site.

The browser test runs when ``_build/html`` exists (build it with
``jupyter-book build . -W -n --keep-going``) or when ``DIFFCP_BROWSER_TEST=1``; in the latter
case a missing build is a failure, not a skip.
"""

from __future__ import annotations

import configparser
import functools
import http.server
import os
import re
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
REPO_URL = "https://github.com/diffcp/diffcp"
BROWSER_REQUIRED = os.environ.get("DIFFCP_BROWSER_TEST") == "1"
EXPECTED_CHAPTERS = [
    "book/01_icp_in_five_steps",
    "book/02_soft_correspondences",
    "book/03_soft_rejection_and_weighting",
    "book/04_minimising_the_error",
    "book/05_differentiating_through_icp",
    "book/06_validation_against_open3d",
    "book/07_tailor_it_to_the_hardware",
    "book/08_body_depth_maps",
    "book/09_modelnet40_and_deep_closest_point",
    "book/10_training_dcp_through_icp",
    "book/11_does_icp_need_to_be_differentiable",
    "book/12_fitting_the_body",
]


def _yaml(path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def toc_files():
    """All files of _toc.yml in reading order (root first)."""
    toc = _yaml(ROOT / "_toc.yml")
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return files


def chapter_notebooks():
    """The toc entries that are chapter notebooks (book/NN_*)."""
    return [f for f in toc_files() if re.fullmatch(r"book/\d\d_\w+", f)]


# --------------------------------------------------------------------------- static checks


def test_config_matches_the_contract():
    cfg = _yaml(ROOT / "_config.yml")
    assert cfg["title"] == "Differentiable ICP"
    assert cfg["only_build_toc_files"] is True
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert cfg["bibtex_bibfiles"] == ["book/references.bib"]
    assert {"dollarmath", "amsmath", "colon_fence"} <= set(cfg["parse"]["myst_enable_extensions"])
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert cfg["repository"]["url"] == REPO_URL and cfg["repository"]["path_to_book"] == ""
    assert re.fullmatch(r"v\d+\.\d+\.\d+", cfg["repository"]["branch"])   # the release tag (tests/test_colab.py)
    assert cfg["html"]["use_repository_button"] is True
    assert cfg["sphinx"]["config"]["math_numfig"] is True
    assert "book/CHAPTER_TEMPLATE.md" in cfg["exclude_patterns"]


def test_toc_lists_exactly_the_book():
    toc = _yaml(ROOT / "_toc.yml")
    assert toc["format"] == "jb-book" and toc["root"] == "book/intro"
    assert all(part.get("numbered") is not None for part in toc["parts"])
    assert toc_files() == ["book/intro", *EXPECTED_CHAPTERS, "book/gpu", "book/bibliography"]
    for f in ["book/intro.md", "book/gpu.md", "book/bibliography.md", "book/references.bib"]:
        assert (ROOT / f).is_file(), f


def test_every_citation_is_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = re.findall(r"^@\w+\{([^,\s]+),", bib, flags=re.M)
    assert len(keys) == len(set(keys)), "duplicate bibtex keys"
    assert len(keys) >= 30
    for entry in re.split(r"\n(?=@)", bib):
        if entry.startswith("@"):
            assert re.search(r"\byear\s*=\s*\{\d{4}\}", entry), entry.splitlines()[0]
            assert re.search(r"\btitle\s*=", entry), entry.splitlines()[0]
    texts = [p.read_text() for p in (ROOT / "book").glob("*.md") if p.name != "CHAPTER_TEMPLATE.md"]
    texts += [p.read_text() for p in (ROOT / "book").glob("*.ipynb")]
    cited = {k.strip() for t in texts for group in re.findall(r"\{cite[a-z:]*\}`([^`]+)`", t) for k in group.split(",")}
    assert cited, "the introduction cites nothing"
    assert cited <= set(keys), f"unknown citation keys: {sorted(cited - set(keys))}"


def test_sanitizer_masks_volatile_text_only():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "tests" / "nbval_sanitize.cfg")

    def sanitize(text):
        for section in cfg.sections():
            text = re.sub(cfg[section]["regex"], cfg[section]["replace"], text)
        return text

    assert sanitize("took 1.23 ms, then 0.5 s and 12 it/s") == "took TIME, then TIME and RATE"
    assert sanitize("<object at 0x7f3a2b1c9d80>") == "<object at ADDRESS>"
    assert sanitize('id="a1b2c3d4-e5f6-4789-abcd-0123456789ab"') == 'id="UUID"'
    kept = "rotation error 0.0500 deg, RMSE 1.34, 5 shapes, 30 iterations, x = 3.5e-04"
    assert sanitize(kept) == kept


def test_execute_chapters_finds_and_rejects(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import execute_chapters
    finally:
        sys.path.pop(0)
    found = execute_chapters.find_chapters([])
    assert all(re.fullmatch(r"\d\d_\w+\.ipynb", p.name) for p in found)
    with pytest.raises(SystemExit, match="no chapter notebook matches"):
        execute_chapters.find_chapters(["99_does_not_exist"])


def test_execute_chapters_runs_a_notebook_and_fails_loudly(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import execute_chapters
    finally:
        sys.path.pop(0)
    good = nbformat.v4.new_notebook(metadata={"colab": {"provenance": []}})
    good.cells = [nbformat.v4.new_code_cell("import os\nprint(os.path.basename(os.getcwd()), 6 * 7)")]
    path = tmp_path / "good.ipynb"
    nbformat.write(good, path)
    assert execute_chapters.main([str(path), "--timeout", "120"]) == 0
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].outputs[0]["text"] == "book 42\n"  # cwd is book/
    assert nb.metadata["colab"] == {"provenance": []}  # metadata kept
    bad = nbformat.v4.new_notebook()
    bad.cells = [nbformat.v4.new_code_cell("raise RuntimeError('chapter broke')")]
    bad_path = tmp_path / "bad.ipynb"
    nbformat.write(bad, bad_path)
    before = bad_path.read_text()
    assert execute_chapters.main([str(bad_path), "--timeout", "120"]) == 1
    assert bad_path.read_text() == before  # a failed run does not overwrite


def test_viz_figures():
    pytest.importorskip("plotly")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from diffcp import viz

    viz.use_book_style()
    first = dict(matplotlib.rcParams)
    viz.use_book_style()
    assert dict(matplotlib.rcParams) == first  # deterministic, idempotent
    assert matplotlib.rcParams["svg.hashsalt"] == "diffcp"

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 7, 3, generator=g, dtype=torch.float64)
    fig = viz.plot_clouds(a, b, labels=["source", "target"], title="t", lengths=[7, 4])
    assert [t.name for t in fig.data] == ["source", "target"]
    assert len(fig.data[1].x) == 4  # padding cut off
    assert abs(fig.data[0].z[3] - float(a[3, 2])) < 1e-5
    assert fig.layout.scene.aspectmode == "data"
    with pytest.raises(ValueError, match="labels"):
        viz.plot_clouds(a, b, labels=["only one"])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        viz.plot_clouds(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="fig"):
        viz.show_plotly("not a figure")

    ax = plt.figure().add_subplot(projection="3d")
    viz.matplotlib_clouds(ax, a, b[:3], labels=["s", "t"])
    assert len(ax.collections) == 2
    assert ax.get_xlim()[0] <= float(torch.cat([a, b[:3]])[:, 0].min())
    with pytest.raises(ValueError, match="3-D axes"):
        viz.matplotlib_clouds(plt.figure().add_subplot(), a)
    plt.close("all")


def test_viz_missing_plotly_is_a_clear_import_error(monkeypatch):
    from diffcp import viz

    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match=r"pip install \"diffcp-icp\[book\]\""):
        viz.plot_clouds([[0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- browser check

browser = pytest.mark.skipif(
    not (HTML.is_dir() or BROWSER_REQUIRED),
    reason="no _build/html; build the book or set DIFFCP_BROWSER_TEST=1",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").is_file():
        pytest.fail(f"{HTML} holds no built book; run `jupyter-book build . -W -n --keep-going` first.")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, chromedriver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(binary) and os.path.exists(chromedriver)):
        if BROWSER_REQUIRED:
            pytest.fail("DIFFCP_BROWSER_TEST=1 but /usr/bin/chromium or /usr/bin/chromedriver is missing.")
        pytest.skip("Chromium and chromedriver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--enable-unsafe-swiftshader", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _severe_errors(drv):
    """SEVERE console entries, except failed loads of *external* resources (this check runs
    offline: the theme's MathJax CDN cannot be reached; every local resource must load)."""
    errors = []
    for entry in drv.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        msg = entry["message"]
        url = msg.split(" ", 1)[0]
        external = url.startswith(("http://", "https://")) and not url.startswith("http://127.0.0.1")
        if external and "net::ERR_" in msg:
            continue
        errors.append(msg)
    return errors


LOCAL_MATHJAX = ROOT / "book" / "_static" / "mathjax" / "tex-chtml.js"


@browser
def test_chapter_pages_in_chromium(site, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chapters = chapter_notebooks()
    assert chapters, "the table of contents lists no chapter notebooks"
    pages = ["book/intro", *chapters, "book/gpu", "book/bibliography"]
    plotly_pages = []
    for page in pages:
        html_file = HTML / f"{page}.html"
        assert html_file.is_file(), f"{html_file} was not built"
        driver.get(f"{site}/{page}.html")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert driver.find_elements(By.CSS_SELECTOR, "article, main"), f"{page}: no content"
        plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        if plots:
            WebDriverWait(driver, 30).until(
                lambda d: all(p.find_elements(By.CSS_SELECTOR, "svg, canvas") for p in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"))
            )
            plotly_pages.append(page)
        if page in chapters and LOCAL_MATHJAX.exists():
            # the book serves its own MathJax (scripts/setup.sh fetches it): equations typeset offline
            WebDriverWait(driver, 30).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "mjx-container"),
                message=f"{page}: MathJax typeset no equation",
            )
        if page in chapters:
            ref = _yaml(ROOT / "_config.yml")["repository"]["branch"]   # the same ref as the install cells
            expected = f"https://colab.research.google.com/github/diffcp/diffcp/blob/{ref}/{page}.ipynb"
            links = {a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a[href^='https://colab.research.google.com']")}
            assert links == {expected}, f"{page}: Colab links {sorted(links)} != {expected}"
        errors = _severe_errors(driver)
        assert not errors, f"{page}: SEVERE console errors:\n" + "\n".join(errors)
    assert plotly_pages, "no page renders a plotly figure (.js-plotly-plot with an svg/canvas)"


def test_merge_streams_joins_consecutive_pieces_of_one_stream():
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import execute_chapters
    finally:
        sys.path.pop(0)
    out = lambda name, text: nbformat.v4.new_output("stream", name=name, text=text)
    merged = execute_chapters.merge_streams([out("stdout", "a\n"), out("stdout", "b\n"),
                                             out("stderr", "w\n"), out("stdout", "c\n")])
    assert [(o["name"], o["text"]) for o in merged] == [("stdout", "a\nb\n"), ("stderr", "w\n"), ("stdout", "c\n")]


@pytest.mark.parametrize("chapter", EXPECTED_CHAPTERS, ids=lambda c: c[5:7])
def test_stored_chapter_is_light_and_shows_each_output_once(chapter):
    nbformat = pytest.importorskip("nbformat")
    path = ROOT / f"{chapter}.ipynb"
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB (limit 1 MB)"
    nb = nbformat.read(path, as_version=4)
    for k, cell in enumerate(nb.cells):
        streams = [o.get("name") if o.get("output_type") == "stream" else None for o in cell.get("outputs", [])]
        split = [a for a, b in zip(streams, streams[1:]) if a is not None and a == b]
        assert not split, f"{path.name}, cell {k}: one stream printed as {len(split) + 1} boxes"


# --------------------------------------------------------------------------- layout check

DESKTOP, PHONE = 1280, 400
FIT_PAGES = ["book/intro", *EXPECTED_CHAPTERS, "book/gpu", "book/bibliography"]

# Runs in the page: counts the code blocks, output blocks, tables and display equations of the
# article and lists the ones that do not fit their column. A block "does not fit" when it, a box
# inside it, or the nearest ancestor that clips or scrolls it (its scroll container) is wider
# inside than outside (scrollWidth > clientWidth + 1), or when it reaches out of the text column.
_MEASURE_JS = r"""
const done = arguments[arguments.length - 1];
const settle = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 50))));
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  if (document.fonts) await document.fonts.ready;
  await settle();
  const article = document.querySelector("article.bd-article") || document.querySelector("main");
  const column = article.getBoundingClientRect();
  const kinds = {  // one element per block
    code: "div.highlight",
    output: "div.cell_output > *",
    table: "table",
    equation: "div.math",
  };
  const scroller = el => {
    for (let a = el.parentElement; a && a !== article; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== "visible") return a;
    return null;
  };
  // an element scrolls when it clips or scrolls sideways and its content is wider than its box
  // (elements that let their content overflow visibly are caught by the column check instead)
  const scrolls = el => getComputedStyle(el).overflowX !== "visible" && el.scrollWidth > el.clientWidth + 1;
  const describe = el => (el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 70);
  const blocks = {}, bad = [];
  for (const [kind, selector] of Object.entries(kinds)) {
    let els = [...article.querySelectorAll(selector)];
    if (kind === "code") els = els.filter(el => !el.closest("div.cell_output"));
    els = els.filter(el => el.getClientRects().length);  // rendered
    blocks[kind] = els.length;
    for (const el of els) {
      const box = scroller(el), parts = [el, ...el.querySelectorAll("pre, div, table, mjx-container")];
      const inner = parts.find(scrolls);
      const out = parts.find(e => { const r = e.getBoundingClientRect(); return r.width && (r.right > column.right + 1 || r.left < column.left - 1); });
      const name = e => e === el ? "" : e.tagName.toLowerCase() + " inside ";
      let why = null;
      if (inner) why = `${name(inner)}scrolls: ${inner.scrollWidth} > ${inner.clientWidth}`;
      else if (box && scrolls(box))
        why = `its ${box.tagName.toLowerCase()}.${[...box.classList].join(".")} scrolls: ${box.scrollWidth} > ${box.clientWidth}`;
      else if (out) {
        const r = out.getBoundingClientRect();
        why = `${name(out)}reaches out of the column: [${Math.round(r.left)}, ${Math.round(r.right)}] vs [${Math.round(column.left)}, ${Math.round(column.right)}]`;
      }
      if (why) bad.push({kind, why, text: describe(el)});
    }
  }
  const doc = document.documentElement;
  done({blocks, bad, viewport: window.innerWidth, clientWidth: doc.clientWidth, scrollWidth: doc.scrollWidth});
})().catch(e => done({error: String(e)}));
"""

_FIGURES_JS = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const imgs = [...document.querySelectorAll("article img")];
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; })));
  const broken = imgs.filter(img => !(img.naturalWidth > 0)).map(img => img.getAttribute("src"));
  const plots = [...document.querySelectorAll("article .plotly-graph-div")];
  const blank = plots.filter(p => !p.querySelector("svg, canvas")).map(p => p.id);
  const text = document.querySelector("article").innerText;
  const refs = [...document.querySelectorAll("article a[href*='#equation-']")].map(a => a.getAttribute("href"));
  const unresolved = [...document.querySelectorAll("article .xref.eq, article span.eq, article .math-ref-missing")]
    .filter(el => !el.closest("a")).map(el => el.textContent);
  done({images: imgs.length, broken, plots: plots.length, blank, missing: text.includes("???"), refs, unresolved});
})().catch(e => done({error: String(e)}));
"""


def _load(driver, url, width):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(width, 900)
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # open every dropdown so that the blocks folded into them are measured too
    driver.execute_script("document.querySelectorAll('article details').forEach(d => d.open = true)")
    got = driver.execute_script("return window.innerWidth")
    assert got == width, f"the browser window is {got} px wide, not {width}: the layout check cannot run"


@browser
def test_pages_fit_desktop_and_phone_screens(site, driver):
    """At 1280 px no code block, output, table or display equation scrolls sideways; at 400 px
    (a phone) equations and tables still fit and the page never scrolls sideways (code and output
    blocks may scroll inside their own box). Every equation reference resolves; every figure
    renders."""
    driver.set_script_timeout(60)
    failures = []
    try:
        for page in FIT_PAGES:
            url = f"{site}/{page}.html"
            _load(driver, url, DESKTOP)
            figs = driver.execute_async_script(_FIGURES_JS)
            assert "error" not in figs, f"{page}: {figs}"
            failures += [f"{page}: image {src} does not render" for src in figs["broken"]]
            failures += [f"{page}: plotly figure {i} draws no svg/canvas" for i in figs["blank"]]
            if figs["missing"]:
                failures.append(f"{page}: '???' in the text (an unresolved number)")
            failures += [f"{page}: unresolved equation reference {t!r}" for t in figs["unresolved"]]
            for href in figs["refs"]:
                target, _, anchor = href.partition("#")
                html = (HTML / page).parent / target if target else HTML / f"{page}.html"
                if not (html.is_file() and f'id="{anchor}"' in html.read_text()):
                    failures.append(f"{page}: equation reference {href} points nowhere")
            for width in (DESKTOP, PHONE):
                if width != DESKTOP:
                    _load(driver, url, width)
                m = driver.execute_async_script(_MEASURE_JS)
                assert "error" not in m, f"{page} at {width} px: {m}"
                if width == DESKTOP:
                    bad = m["bad"]
                else:
                    bad = [b for b in m["bad"] if b["kind"] in ("table", "equation")]
                    if m["scrollWidth"] > m["clientWidth"]:
                        failures.append(f"{page} at {width} px: the page scrolls sideways "
                                        f"({m['scrollWidth']} > {m['clientWidth']} px)")
                counts = {}
                for b in bad:
                    counts[b["kind"]] = counts.get(b["kind"], 0) + 1
                if bad:
                    summary = ", ".join(f"{n} of {m['blocks'][k]} {k} blocks" for k, n in counts.items())
                    failures.append(f"{page} at {width} px: {summary} do not fit:\n" + "\n".join(
                        f"    {b['kind']}: {b['why']} -- {b['text']}" for b in bad))
    finally:
        driver.set_window_size(DESKTOP, 900)
    assert not failures, f"{len(failures)} layout failures:\n" + "\n".join(failures)
