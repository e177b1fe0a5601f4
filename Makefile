PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

# The README's test command.
test:
	$(PY) -m pytest -q tests

lint:
	$(PY) -m pyflakes mdregnet tests experiments
