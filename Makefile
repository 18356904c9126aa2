# The two quick-start commands (`make demo`, `make test`) and the linters.
# Each target creates the virtual environment in .venv on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

# ARGS passes options to taskmill serve, e.g. make demo ARGS="--port 8001".
demo: $(STAMP)
	$(VENV)/bin/taskmill serve $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src

bench: $(STAMP)
	$(PYTHON) bench/run.py
