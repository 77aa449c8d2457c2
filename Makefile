# Two commands for a newcomer (see README): `make demo` and `make test`.
# Both create .venv (CPU torch 2.13.0 here; any torch >= 2.4 elsewhere), build the C++ backend, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# make demo PRESET=gpu (or gpu-small, tiny): see `petal-fast demo --help`
PRESET ?= cpu

$(BIN)/.installed: pyproject.toml setup.py petal_fast/_build.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)" numpy ninja pybind11
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/python -m petal_fast.info --require-fast > /dev/null || (echo "compiled CPU ops unavailable (see above)" && exit 1)
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m petal_fast.cli demo --preset $(PRESET)

bench: setup
	$(BIN)/python -m benchmarks --quick

.PHONY: setup test demo bench
