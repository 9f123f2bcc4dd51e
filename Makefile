# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint typecheck unit data clean

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

test: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
