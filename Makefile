# emu3-train — the commands a newcomer needs:
#   make pretrain-stage1          install, build the demo shards, train + evaluate the tiny demo model
#   make test                     install (if needed) and run the whole test suite
#   make post-train-demo          after pretrain-stage1: the post-training demos in order (chat SFT, ...)
# On a cluster:
#   make pretrain-stage1 MODEL=emu3_8b DATA=/path/to/shards EXTRA="trainer.max_steps=1000"
#   make pretrain-stage2 MODEL=emu3_8b DATA=/path/to/long/shards INIT=runs/stage1/ckpt/latest
#   make pretrain-stage1 GPUS_PER_NODE=8 EXTRA="parallel.cp=2"        (torchrun on this node)
#   make pretrain-stage1 NNODES=2 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=node0 MODEL=emu3_8b DATA=...
#                                 (the same on every node, NODE_RANK=0..NNODES-1; slurm: launch/slurm.sbatch)

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
CHAT_DIR ?= data/demo_chat
DPO_DIR ?= data/demo_dpo
STAGE1_CKPT ?= runs/demo-stage1/ckpt/latest
# One process: plain python. More (GPUS_PER_NODE per node x NNODES): launch/torchrun.sh, which reads
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (from here or the environment). NPROC: old name.
NNODES ?= 1
NPROC ?= 1
GPUS_PER_NODE ?= $(NPROC)
NODE_RANK ?=
MASTER_ADDR ?=
MASTER_PORT ?=
TORCHRUN_ENV := $(strip NNODES=$(NNODES) $(if $(NODE_RANK),NODE_RANK=$(NODE_RANK)) \
	$(if $(MASTER_ADDR),MASTER_ADDR=$(MASTER_ADDR)) $(if $(MASTER_PORT),MASTER_PORT=$(MASTER_PORT)))
LAUNCH := $(if $(and $(filter 1,$(NNODES)),$(filter 1,$(GPUS_PER_NODE))),$(PY) -m emu3_train.train,\
	$(TORCHRUN_ENV) PY=$(PY) launch/torchrun.sh $(GPUS_PER_NODE))

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

.PHONY: install test pretrain-stage1 pretrain-stage2 demo-data bench lint clean clean-all \
	post-train-demo post-train-demo-chat post-train-demo-dpo

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

# The post-training demos, each continuing the one before; a later stage adds itself as a
# prerequisite after post-train-demo-chat (make runs prerequisites in the order listed).
post-train-demo: post-train-demo-chat post-train-demo-dpo

# Instruction tuning on the digits chat set from the stage-1 demo weights -> runs/demo-chat/eval.json
post-train-demo-chat: install
	@test -e $(STAGE1_CKPT) || { echo "error: $(STAGE1_CKPT) does not exist; run make pretrain-stage1 first" >&2; \
		exit 2; }
	$(PY) -m emu3_train.data_pipelines.demo_chat --out $(CHAT_DIR)
	$(PY) -m emu3_train.train experiment=demo_chat data.path=$(CHAT_DIR)/train \
		checkpoint.init_from=$(STAGE1_CKPT) $(EXTRA)
	$(PY) -m emu3_train.chat_eval runs/demo-chat/ckpt/latest --data $(CHAT_DIR)/eval --out runs/demo-chat/eval.json

# DPO from the stage-1 demo weights: K = 8 samples per training caption scored by a k-NN reward model,
# best vs worst pairs (reference log-probs stored), DPO, then the judge before/after -> runs/demo-dpo/
post-train-demo-dpo: install
	@test -e $(STAGE1_CKPT) || { echo "error: $(STAGE1_CKPT) does not exist; run make pretrain-stage1 first" >&2; \
		exit 2; }
	$(PY) -m emu3_train.data_pipelines.demo --out $(DEMO_DIR)
	$(PY) -m emu3_train.data_pipelines.demo_reward --prompts $(DPO_DIR)/prompts/train.jsonl
	$(PY) -m emu3_train.data_pipelines.make_preferences $(STAGE1_CKPT) --prompts $(DPO_DIR)/prompts/train.jsonl \
		--out $(DPO_DIR)/pairs --grid 8x8 --k 8 --scorer 'emu3_train.data_pipelines.demo_reward:make_scorer()' \
		--prompts-per-batch 32 --device cpu
	$(PY) -m emu3_train.train experiment=demo_dpo data.path=$(DPO_DIR)/pairs checkpoint.init_from=$(STAGE1_CKPT) $(EXTRA)
	$(PY) -m emu3_train.dpo_eval $(STAGE1_CKPT) runs/demo-dpo/ckpt/latest --train $(DEMO_DIR)/train \
		--eval $(DEMO_DIR)/eval --out runs/demo-dpo

bench: install
	@for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck launch/torchrun.sh launch/slurm.sbatch launch/tokenize.sbatch benchmarks/gpu_check.sh

clean:
	rm -rf runs outputs multirun build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-all: clean
	rm -rf $(VENV) data
