# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Material for MkDocs prints a banner about MkDocs 2 on every build; the build itself is unchanged.
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test docs lint typecheck unit data clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# The demo saves a plot of its run: matplotlib, the `plot` extra.
$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[plot]'
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: the Quickstart model trained with fit on the real FashionMNIST; the weights, the
# per-epoch CSV and the plot of the run go to runs/quickstart/.
demo: $(VENV)/.demo data
	$(PY) examples/quickstart.py

# Real data offline: when no copy is found and this is Debian as root, install the dataset package.
data: $(VENV)/.base
	@$(PY) -c "import trainkit; trainkit.fashion_mnist(train=False, download=False)" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	  else echo "no FashionMNIST found; the demo will try to download it"; fi; }

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The library, the tests, the examples and tests/typing/ (user-style assert_type snippets).
typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy --strict

# Unit tests and doctests, plus tests/test_docs.py (builds the site with `mkdocs build --strict`)
# and tests/test_packaging.py (builds the wheel, installs it into a fresh venv, type-checks
# tests/typing/ against it).
unit: $(VENV)/.dev
	$(PY) -m pytest -q

test: lint typecheck unit

# The documentation site, into site/ (open site/index.html); fails on any broken reference.
docs: $(VENV)/.dev
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site dist
