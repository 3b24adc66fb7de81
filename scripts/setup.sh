#!/usr/bin/env bash
# Set up a fresh machine for diffcp: the Python packages pinned for CI (torch first, a CPU build)
# and, with "--test", the Debian packages the tests need (Chromium for the browser check,
# libusb for Open3D). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ "${1:-}" == "--test" ]]; then
  need=()
  for p in chromium chromium-driver libusb-1.0-0; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if (( ${#need[@]} )); then
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
# torch is pinned on its own line first so that nothing pulls an unpinned (multi-GB CUDA) build.
$PYTHON -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements-ci.txt)"
$PYTHON -m pip install -q --disable-pip-version-check -r requirements-ci.txt
$PYTHON -m pip install -q --disable-pip-version-check --no-deps -e .
# MathJax for the offline book (book/_ext/book_fixes.py serves it when present): from the npm
# registry, pinned; skipped without npm, and then the built pages load MathJax from its CDN.
MATHJAX=3.2.2
if [[ ! -f book/_static/mathjax/tex-chtml.js ]] && command -v npm >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack --silent "mathjax@$MATHJAX" >/dev/null && tar xzf "mathjax-$MATHJAX.tgz"); then
    mkdir -p book/_static/mathjax/output/chtml/fonts
    cp "$tmp/package/es5/tex-chtml.js" book/_static/mathjax/
    cp -r "$tmp/package/es5/output/chtml/fonts/woff-v2" book/_static/mathjax/output/chtml/fonts/
    cp "$tmp/package/LICENSE" book/_static/mathjax/
  else
    echo "setup: could not fetch MathJax $MATHJAX from npm; the book will load it from its CDN" >&2
  fi
  rm -rf "$tmp"
fi
