# One source for every command: CI runs .ci/run, which runs `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first from this spec, so that resolving the rest never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install lighter-venv demo test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# Lighter 0.1.0 (numpy<2, pytorch-lightning) in a virtualenv of its own, so that it never moves the test
# environment's torch or numpy; tests/test_lighter_real.py runs its CLI. torch resolves with the rest, so that
# nothing pulls a CUDA build. torchvision then goes: PyPI's builds need a CUDA torch and fail to import beside
# the CPU one (torchmetrics would import it); the test brings a stand-in for the one call Lighter makes.
LIGHTER_VENV ?= .venv-lighter
LIGHTER_STAMP := $(LIGHTER_VENV)/.installed

$(LIGHTER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LIGHTER_VENV)
	$(LIGHTER_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LIGHTER_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "lighter==0.1.0" -e ".[image]"
	$(LIGHTER_VENV)/bin/python -m pip uninstall --quiet --yes torchvision
	touch $@

lighter-venv: $(LIGHTER_STAMP)

demo: $(STAMP)
	$(BIN)/lighter-sink demo

lint: $(STAMP)
	$(BIN)/ruff check lighter_sink tests benchmarks examples
	$(BIN)/ruff format --check lighter_sink tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck lighter-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench:
	$(MAKE) install EXTRAS=dev,bench
	$(BIN)/python -m benchmarks.overlap
	$(BIN)/python -m benchmarks.overlap --storages rclone,moto --workloads 1MiB:2048:8:60 --model none --repeat 1 --name overlap-long
	$(BIN)/python -m benchmarks.ceiling --sizes 4KiB 1MiB --items 512
	$(BIN)/python -m benchmarks.stall
	$(BIN)/python -m benchmarks.stall --size 1MiB --batch 8 --step-ms 60 --batches 200 --json benchmarks/results/stall-1mib.json
	$(BIN)/python -m benchmarks.memory
	$(BIN)/python -m benchmarks.tiny_local
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.shards

clean:
	rm -rf $(VENV) $(LIGHTER_VENV) predictions .pytest_cache .mypy_cache .ruff_cache
