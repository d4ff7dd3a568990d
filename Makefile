# Two commands do everything: `make demo` and `make test`. Both create .venv when missing and (re)install
# normfold with its dev extras only when pyproject.toml or the constraints changed, so they are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.normfold-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu lint typecheck bench clean

$(STAMP): pyproject.toml constraints-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints-dev.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/normfold demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) scripts/check_sizes.py
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# The GPU smoke run: every GPU path once, PASS/FAIL per path (scripts/gpu_smoke.sh); fails without a GPU.
test-gpu: setup
	scripts/gpu_smoke.sh

# Just the static checks of `make test` (which runs them too): mypy (config in pyproject, 0 errors) and the
# size limits (modules <= 500 lines, functions <= 80), without the test suite.
typecheck: setup
	$(VENV)/bin/mypy
	$(PY) scripts/check_sizes.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) normfold-report .pytest_cache
