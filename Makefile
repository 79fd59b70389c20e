# The commands the README names. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this project's machines in /opt/wheels (see DESIGN.md).
export PIP_FIND_LINKS := $(or $(PIP_FIND_LINKS),$(wildcard /opt/wheels))

.PHONY: install vocab demo test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# The GPT-2 vocabulary, from the openai-whisper package on PyPI (sha256-checked).
vocab: install
	$(BIN)/scratchgpt vocab

# The main job.
demo: vocab
	$(BIN)/scratchgpt generate --preset 124M --max-new-tokens 20 "Every effort moves you"

# Fast tests (the default); tests needing ../shared skip with the reason when it is absent.
test: vocab
	$(BIN)/python -m pytest

# Everything, slow tests included.
test-all: vocab
	$(BIN)/python -m pytest -m ""

bench: vocab
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
