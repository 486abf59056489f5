# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv (Python 3.12) on first use and reuse it while
# pyproject.toml and requirements.lock are unchanged.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kuavo-installed
# Python 3.12: the first candidate that really runs (a pyenv shim on PATH
# may exist without a 3.12 selected, so each one is tried, not just found).
PYTHON312 ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r) $$(command -v python3.12 2>/dev/null); do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
# The embedded default never touches a model hub.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (put python3.12 on PATH or set PYTHON312=...)"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON312) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

# The full four-stage pipeline on the embedded default, then its report.
demo: setup
	$(BIN)/kuavo-train demo

test: setup
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf outputs/demo
