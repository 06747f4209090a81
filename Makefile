# kimivl: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch (users with a GPU install the CUDA build they want first).
TORCH  ?= torch==2.13.0

.PHONY: install test test-fast lint bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -n 2 --dist loadgroup -q

lint: install
	$(VENV)/bin/ruff check kimivl_cli tests benchmarks
	$(VENV)/bin/ruff format --check kimivl_cli tests benchmarks

bench: install
	$(PY) benchmarks/run_all.py

demo: install
	$(PY) -m kimivl_cli.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
