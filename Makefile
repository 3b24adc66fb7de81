# The two commands of the README's quick start:
#   make book   set up, then build the HTML book offline into _build/html
#   make test   set up, then run every test: unit tests, the book build with warnings as errors,
#               every chapter in fresh Colab-like environments (tests/test_colab.py),
#               the browser check of the built site, and strict nbval over every chapter
PYTHON ?= python3
PYTEST = $(PYTHON) -m pytest -p no:dash -p no:cacheprovider

.PHONY: book test setup setup-test build-book notebooks benchmark

book: setup build-book

test: setup-test build-book
	DIFFCP_BROWSER_TEST=1 DIFFCP_COLAB_TEST=1 DIFFCP_PLOTLYJS=site $(PYTEST) tests book --nbval --nbval-current-env \
	  --sanitize-with tests/nbval_sanitize.cfg -q -rs

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

build-book:
	rm -rf _build/html
	jupyter-book build . -W -n --keep-going

# Re-execute every chapter in place to refresh its stored outputs (commit the result).
notebooks:
	$(PYTHON) scripts/execute_chapters.py

benchmark:
	$(PYTHON) benchmarks/bench_icp.py
