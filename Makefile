# make run  — set up .venv (first time) and run the quick-start Optuna study
# make test — set up .venv (first time) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, installed only when the venv has no torch yet, so
# that pip does not resolve a multi-GB CUDA build. GPU users: install your
# torch into $(VENV) first (or set TORCH_PIP_ARGS to your index), then make.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=

.PHONY: setup run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# One 1-thread worker per core (workers x threads = cores): small convolutions scale poorly across threads.
run: setup
	$(BIN)/python -m fmnist_sweep workers +experiment=quickstart

# Two test processes: most of the suite waits on subprocesses and servers, not on a core.
test: setup
	$(BIN)/python -m pytest -n 2 --dist worksteal

clean:
	rm -rf $(VENV) mlruns.db mlartifacts
