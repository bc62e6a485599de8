# emu3-train — the commands a newcomer needs:
#   make pretrain-stage1          install, build the demo shards, train + evaluate the tiny demo model
#   make test                     install (if needed) and run the whole test suite
# On a cluster:
#   make pretrain-stage1 MODEL=emu3_8b DATA=/path/to/shards EXTRA="trainer.max_steps=1000"
#   make pretrain-stage2 MODEL=emu3_8b DATA=/path/to/long/shards INIT=runs/stage1/ckpt/latest
#   make pretrain-stage1 NPROC=8 EXTRA="parallel.cp=2"      (torchrun on this node; launch/ for more)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
MODEL ?= tiny
DATA ?= demo
INIT ?=
EXTRA ?=
DEMO_DIR ?= data/demo
NPROC ?= 1
LAUNCH := $(if $(filter 1,$(NPROC)),$(PY) -m emu3_train.train,launch/torchrun.sh $(NPROC))

# Every pip call (build isolation included) is pinned to the CPU/CUDA torch we chose.
export PIP_CONSTRAINT := $(abspath constraints.txt)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TIKTOKEN_CACHE_DIR :=
# DeepSpeed is used for Ulysses only: install it without compiling its CUDA/C++ ops.
export DS_BUILD_OPS := 0

ifeq ($(DATA),demo)
STAGE1_ARGS := experiment=demo model=$(MODEL)
STAGE1_DEPS := demo-data
STAGE2_ARGS := experiment=demo_stage2 model=$(MODEL) $(if $(INIT),checkpoint.init_from=$(INIT))
else
STAGE1_ARGS := experiment=stage1 model=$(MODEL) data=shards data.path=$(DATA)
STAGE1_DEPS :=
STAGE2_ARGS := experiment=stage2 model=$(MODEL) data=shards data.path=$(DATA) \
	$(if $(INIT),checkpoint.init_from=$(INIT))
endif

.PHONY: install test pretrain-stage1 pretrain-stage2 demo-data bench lint clean clean-all

install: $(VENV)/.install-stamp

$(VENV)/.install-stamp: pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $@

test: install
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; rc=0; fi; exit $$rc

demo-data: install
	$(PY) -m emu3_train.data_pipelines.demo --out $(DEMO_DIR)

pretrain-stage1: install $(STAGE1_DEPS)
	$(LAUNCH) $(STAGE1_ARGS) $(EXTRA)

pretrain-stage2: install $(STAGE1_DEPS)
	$(LAUNCH) $(STAGE2_ARGS) $(EXTRA)

bench: install
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs outputs multirun build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-all: clean
	rm -rf $(VENV) data
