# Two commands do everything on a fresh machine; each creates or reuses the virtualenv.
#   make train   the main job on the embedded default (synthetic set, tiny model, CPU);
#                CONFIG=... and WORKDIR=... override, e.g. CONFIG=configs/synthetic.py:runlocal
#   make test    the test suite (what CI runs)
#   make lint    ruff check and ruff format --check
#   make reproduce  train the default dense and gaze models, then sweep methods x KV budgets
# train and reproduce install only the package and its runtime dependencies (pip install -e .);
# test and lint add the [dev,lmms] extras and lmms-eval (requirements.txt,
# requirements-lmms-eval.txt). Each stamp re-installs when the files it lists change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic
CONFIG ?= configs/synthetic.py
RUNTIME := $(VENV)/.installed-runtime
FULL := $(VENV)/.installed

.PHONY: install install-dev train test lint reproduce
install: $(RUNTIME)
install-dev: $(FULL)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(FULL): $(RUNTIME) pyproject.toml requirements.txt requirements-lmms-eval.txt
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

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
