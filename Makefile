# The commands the README names. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this project's machines in /opt/wheels (see DESIGN.md).
export PIP_FIND_LINKS := $(or $(PIP_FIND_LINKS),$(wildcard /opt/wheels))

.PHONY: install vocab kernels demo test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,serve]"
	touch $@

# The GPT-2 vocabulary, from the openai-whisper package on PyPI (sha256-checked).
vocab: install
	$(BIN)/scratchgpt vocab

# The CPU decode kernels (x86 with AVX-512), compiled once into ~/.cache/scratchgpt/kernels here rather
# than inside the demo's timed training; elsewhere, or without a C++ compiler, a warning and nothing else.
kernels: install
	$(BIN)/python -c "from scratchgpt.kernels import decode_ops; decode_ops()"

# The main job: train a small GPT (4 layers, 256 wide) on the Python reference docs that ship with
# every Python, for about 3.5 minutes on CPU, then sample from it. Writes runs/demo/ (checkpoints,
# metrics.jsonl, loss.png). Point --data at your own text, or add --init gpt2:124M to fine-tune GPT-2.
# The recipe (context, batch, learning rate, steps) was chosen by measurement: benchmarks/README.md.
# bf16 where the CPU multiplies it natively (AVX-512 BF16 or AMX), else the default (fp32 on a CPU).
DEMO_DTYPE ?= $(shell grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo bf16 || echo auto)
DEMO_ARGS ?=
demo: vocab kernels
	rm -rf runs/demo  # each demo starts afresh (train refuses to overwrite a run without --resume)
	$(BIN)/scratchgpt train --corpus pydoc --out-dir runs/demo \
		--n-layers 4 --emb-dim 256 --n-heads 4 --context-length 256 --drop-rate 0 --dtype $(DEMO_DTYPE) \
		--batch-size 4 --lr 1e-3 --warmup 10 --max-steps 300 --max-minutes 3.5 --eval-every 60 --eval-iters 5 \
		--sample-prompt "The with statement" $(DEMO_ARGS)
	$(BIN)/scratchgpt generate --checkpoint runs/demo/best.pt --max-new-tokens 60 \
		--temperature 0.8 --top-k 40 --seed 1 "The for statement is used to"

# Fast tests (the default); tests needing ../shared skip with the reason when it is absent.
test: vocab kernels
	$(BIN)/python -m pytest

# Everything, slow tests included.
test-all: vocab kernels
	$(BIN)/python -m pytest -m ""

bench: vocab kernels
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
