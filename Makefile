# Two commands do everything on a fresh machine; each creates or reuses the virtualenv.
#   make train   the main job on the embedded default (synthetic set, tiny model, CPU);
#                CONFIG=... and WORKDIR=... override, e.g. CONFIG=configs/synthetic.py:runlocal
#   make test    the test suite (what CI runs)
#   make reproduce  train the default dense and gaze models, then sweep methods x KV budgets
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic
CONFIG ?= configs/synthetic.py

.PHONY: install train test lint reproduce
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-lmms-eval.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-lmms-eval.txt
	touch $@

train: install
	$(PY) -m gazejax.train --config $(CONFIG) --workdir $(WORKDIR)

SWEEP := --methods dense,gaze,dense_reduced,evict_question --budgets 0.11,0.22,0.44
reproduce: install
	$(PY) -m gazejax.train --config configs/synthetic.py --workdir runs/dense_default
	$(PY) -m gazejax.train --config configs/synthetic.py:attention=gaze --workdir runs/gaze_default
	$(PY) -m gazejax.evaluate --workdir runs/gaze_default $(SWEEP)
	$(PY) -m gazejax.evaluate --workdir runs/dense_default $(SWEEP)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
