/* The book fits the screen (with fit.css; loaded on every page by book/_ext/book_fixes.py).
 *
 * 1. Display equations. MathJax 3 does not break lines, so an equation wider than its column
 *    (on a phone) would scroll. After MathJax has typeset the page, an equation that does not fit
 *    first gets its number on a line of its own (div.math.fit-wrap), then, if still too wide, a
 *    smaller font size: it shrinks to its column.
 * 2. Text tables in cell outputs. At desktop width fit.css wraps long output lines; for an output
 *    whose lines are aligned columns a wrapped line breaks the table, so when a slightly smaller
 *    font (down to MIN_TABLE_SCALE) fits its widest line, the output keeps its lines unwrapped in
 *    that font (pre.fit-shrunk).
 * Both are measured again when the window has been resized (window.diffcpFit() does it on demand).
 */
(function () {
  "use strict";
  var MIN_TABLE_SCALE = 0.7;

  function overflows(el) {
    return el.scrollWidth > el.clientWidth + 1;
  }

  function fitEquation(box) {
    var math = box.parentElement;
    if (box.dataset.fitFont === undefined) box.dataset.fitFont = box.style.fontSize || "";
    box.style.fontSize = box.dataset.fitFont;
    if (math && math.classList.contains("math")) math.classList.remove("fit-wrap");
    if (!overflows(box)) return;
    if (math && math.classList.contains("math") && math.querySelector(":scope > .eqno")) {
      math.classList.add("fit-wrap");
      if (!overflows(box)) return;
    }
    // every length of MathJax's CHTML output is in em: the width scales with the font size
    var size = parseFloat(getComputedStyle(box).fontSize);
    for (var i = 0; i < 4 && overflows(box); i++) {
      size = Math.floor(size * (box.clientWidth - 2) / box.scrollWidth * 100) / 100;
      box.style.fontSize = size + "px";
    }
  }

  function isTextTable(text) {
    // columns: at least half of the lines hold two runs of 2+ spaces between words, or a "|"
    var lines = text.split("\n").filter(function (l) { return l.trim(); });
    var columns = lines.filter(function (l) { return /\S {2,}\S.*\S {2,}\S|\S \| \S/.test(l.trim()); });
    return lines.length > 0 && columns.length >= lines.length / 2;
  }

  // width of the widest line of a pre, unwrapped: a hidden max-content copy beside it
  function unwrappedScale(pre) {
    var copy = pre.cloneNode(true);
    copy.classList.add("fit-shrunk");
    copy.style.cssText = "position: absolute; visibility: hidden; left: 0; top: 0; width: max-content; max-width: none;";
    pre.parentElement.appendChild(copy);
    var cs = getComputedStyle(pre), pad = parseFloat(cs.paddingLeft) + parseFloat(cs.paddingRight);
    var scale = (pre.clientWidth - pad - 2) / (copy.clientWidth - pad);
    copy.remove();
    return scale;
  }

  function fitOutput(pre) {
    pre.classList.remove("fit-shrunk");
    pre.style.fontSize = "";
    if (getComputedStyle(pre).whiteSpace !== "pre-wrap" || !isTextTable(pre.textContent)) return;
    var scale = unwrappedScale(pre);
    if (scale >= 1 || scale < MIN_TABLE_SCALE) return;  // fits unwrapped already, or too wide: wraps
    var size = parseFloat(getComputedStyle(pre).fontSize);
    pre.classList.add("fit-shrunk");
    pre.style.fontSize = Math.floor(size * scale * 100) / 100 + "px";
    if (overflows(pre)) {
      pre.classList.remove("fit-shrunk");
      pre.style.fontSize = "";
    }
  }

  function fitEquations() {
    document.querySelectorAll("mjx-container[display='true']").forEach(fitEquation);
  }

  function fitOutputs() {
    document.querySelectorAll("div.cell_output div.highlight > pre").forEach(fitOutput);
  }

  function fitAll() {
    fitOutputs();
    fitEquations();
  }

  // measured again once the window has stopped changing size for a moment
  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(fitAll, 150);
  });
  window.diffcpFit = fitAll;

  function whenTypeset(tries) {
    var mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      mj.startup.promise.then(fitEquations);
    } else if (tries < 300) {
      // MathJax 3 replaces the window.MathJax configuration object once it has loaded
      setTimeout(function () { whenTypeset(tries + 1); }, 100);
    }
  }

  function start() {
    fitOutputs();
    if (document.fonts && document.fonts.ready) document.fonts.ready.then(fitAll);
    whenTypeset(0);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
