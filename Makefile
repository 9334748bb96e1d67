# `make test` and `make demo` work on a fresh machine with only Python installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint pytest aot demo clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check memzoo tests benchmarks setup.py
	$(VENV)/bin/ruff format --check memzoo tests benchmarks setup.py

pytest: install
	$(PY) -m pytest -q

aot: install
	$(PY) -m memzoo.kernels.aot

test: lint pytest aot

# The quick MQAR sweep: every mixer at two widths, about 5 minutes on an idle 2-core CPU.
demo: install
	$(VENV)/bin/memzoo info
	$(VENV)/bin/memzoo sweep mqar --preset quick --out runs/sweep-mqar-quick
	@echo "table: runs/sweep-mqar-quick/results.md  plot: runs/sweep-mqar-quick/recall_vs_state.png"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
