# Two commands do everything on a fresh machine; each creates or reuses the virtualenv.
#   make train   the main job on the embedded default (synthetic set, tiny model, CPU);
#                CONFIG=... and WORKDIR=... override, e.g. CONFIG=configs/synthetic.py:runlocal
#   make test    the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic
CONFIG ?= configs/synthetic.py

.PHONY: install train test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

train: install
	$(PY) -m gazejax.train --config $(CONFIG) --workdir $(WORKDIR)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
