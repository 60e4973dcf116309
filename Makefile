# Two commands do everything on a fresh machine; each creates or reuses the virtualenv.
#   make train   the main job on the embedded default (synthetic set, tiny model, CPU);
#                CONFIG=... and WORKDIR=... override, e.g. CONFIG=configs/synthetic.py:runlocal
#   make test    the test suite (what CI runs)
#   make lint    ruff check and ruff format --check
#   make reproduce  train the three-question dense and gaze models, then sweep methods x budgets
#   make compile-kernels  compile every Pallas kernel for an H100 (sm_90) and TPU v5e/v6e on
#                this CPU, deviceless, each compiler from its own venv (tests/aot/), the
#                decoder's decode step (no cache-sized copy) and a sharded Pallas training
#                step for a 4-chip v5e:2x2 slice
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

.PHONY: install install-dev train test lint reproduce compile-kernels
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

SWEEP := --methods dense,gaze,dense_reduced,evict_question,blind --budgets 0.11,0.22,0.44
reproduce: install
	$(PY) -m gazejax.train --config configs/synthetic.py:turns=3 --workdir runs/dense_mt
	$(PY) -m gazejax.train --config configs/synthetic.py:turns=3,attention=gaze --workdir runs/gaze_mt
	$(PY) -m gazejax.evaluate --workdir runs/gaze_mt $(SWEEP)
	$(PY) -m gazejax.evaluate --workdir runs/dense_mt $(SWEEP)

# The default suite on TEST_WORKERS pytest-xdist workers (2: CI's cores; each test compiles and
# runs on one core most of the time). The slow tests run serially (.ci/run): their timings matter.
TEST_WORKERS ?= 2
test: install-dev
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Deviceless compiles: the CUDA plugin and libtpu each get a venv (the plugin prints noise into
# every process of its venv). Realistic sizes (Qwen3-4B heads, 4608 + 2048 tokens) for sm_90 and
# v5e (the smallest VMEM); the test sizes for v6e.
AOT_ENV := JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 TPU_WORKER_HOSTNAMES=localhost \
	ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=.
.venv-aot-%/.installed: tests/aot/requirements-%.txt
	$(PYTHON) -m venv .venv-aot-$*
	.venv-aot-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-aot-$*/bin/python -m pip install --quiet -r $<
	touch $@

compile-kernels: .venv-aot-cuda/.installed .venv-aot-tpu/.installed
	$(AOT_ENV) .venv-aot-cuda/bin/python tests/aot/compile_kernels.py --target sm90
	$(AOT_ENV) .venv-aot-cuda/bin/python tests/aot/compile_decode_step.py --target sm90
	$(AOT_ENV) .venv-aot-tpu/bin/python tests/aot/compile_kernels.py --target v5e
	$(AOT_ENV) .venv-aot-tpu/bin/python tests/aot/compile_kernels.py --target v6e --sizes test
	$(AOT_ENV) .venv-aot-tpu/bin/python tests/aot/compile_decode_step.py --target v5e
	$(AOT_ENV) .venv-aot-tpu/bin/python tests/aot/compile_sharded_step.py
