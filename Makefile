# The two commands: `make demo` (set up, then run the pipeline on the phantom cohort) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first, where no GPU is present: otherwise pip pulls gigabytes of CUDA packages.
	command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	PATH=$(BIN):$$PATH dvc repro

test: setup
	PATH=$(BIN):$$PATH pytest -n 2 --durations=15

clean:
	rm -rf stores data .dvc/tmp
