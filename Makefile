# nextgpt-train: one target per step. Targets run inside the project's environment without activation.
#   make env check-ckpt features embeddings stage1 stage2 stage3     (real checkpoints, see README)
#   make demo                                                         (tiny models + toy data, CPU, minutes)
#   make test                                                         (pytest)
# Variables: CONFIG=tiny (tiny configs), NUM_GPUS=N, HOSTFILE=path (multi-node), DS_CONFIG=path, ARGS="--set k=v"

SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CONFIG ?=
NUM_GPUS ?=
HOSTFILE ?=
ARGS ?=

# --- environment: conda env `nextgpt` when conda exists, else .venv -------------------------------------------
CONDA := $(shell command -v conda 2>/dev/null)
ENV_NAME ?= nextgpt
ifneq ($(wildcard $(ROOT)/.venv/bin/python),)
  PY := $(ROOT)/.venv/bin/python
else ifneq ($(CONDA),)
  PY := $(CONDA) run --no-capture-output -n $(ENV_NAME) python
else
  PY := python3
endif
DEEPSPEED := $(PY) -m deepspeed.launcher.runner

# --- which configs and where their outputs go (mirrors the YAML output_dir values) ------------------------------
ifeq ($(CONFIG),tiny)
  CFG_DIR := code/config/tiny
  DS_DIR_DEFAULT := cpu
  CKPT_OUT := ckpt/tiny/delta
  DATA_ROOT := data/toy
  PREREQ_CKPT := ckpt/tiny/.complete
  PREREQ_DATA := data/toy/.complete
else
  CFG_DIR := code/config
  DS_DIR_DEFAULT :=
  CKPT_OUT := ckpt/delta_ckpt/nextgpt/7b_tiva_v0
  DATA_ROOT := data
  PREREQ_CKPT :=
  PREREQ_DATA :=
endif

# DeepSpeed config per stage: code/dsconfig/stage_N.json on GPUs, cpu.json for CONFIG=tiny; DS_CONFIG overrides.
ds_config = $(if $(DS_CONFIG),$(DS_CONFIG),$(if $(DS_DIR_DEFAULT),code/dsconfig/cpu.json,code/dsconfig/$(1).json))

# Launcher: `deepspeed` with --num_gpus / --hostfile when given; a plain single process otherwise on CPU.
LAUNCH = $(DEEPSPEED) $(if $(HOSTFILE),--hostfile $(HOSTFILE),) $(if $(NUM_GPUS),--num_gpus $(NUM_GPUS),$(if $(DS_DIR_DEFAULT),--num_gpus 1,))

PHONY_INTERNAL := _demo _test
.PHONY: $(PHONY_INTERNAL) help env check-ckpt tiny toy-data embeddings features validate stage1 stage2 stage3 finetune infer demo test bench chaos clean-tiny

help:
	@sed -n '1,6p' Makefile

env:
	@bash scripts/make_env.sh && touch .env-ready

# `make demo` / `make test` on a fresh clone set up the environment first (and again when requirements change),
# then run in a sub-make so that PY points into the new environment.
.env-ready: requirements.txt env.yml
	@bash scripts/make_env.sh && touch .env-ready

check-ckpt:
	$(PY) scripts/check_ckpt.py --config $(CFG_DIR)/stage_3.yaml

tiny: ckpt/tiny/.complete
ckpt/tiny/.complete:
	$(PY) scripts/make_tiny_ckpt.py --out ckpt/tiny --data data/toy

toy-data: data/toy/.complete
data/toy/.complete:
	$(PY) scripts/make_toy_data.py --out data/toy

# Caption embeddings (stage 2/3 targets) and ImageBind features (stage-1 cache) for the selected config.
embeddings: $(PREREQ_CKPT) $(PREREQ_DATA)
	$(PY) code/process_embeddings.py --config $(CFG_DIR)/stage_3.yaml --all
features: $(PREREQ_CKPT) $(PREREQ_DATA)
	$(PY) code/process_embeddings.py --config $(CFG_DIR)/stage_1.yaml --all --features

validate:
	$(PY) code/validate_data.py --config $(CFG_DIR)/stage_1.yaml
	$(PY) code/validate_data.py --config $(CFG_DIR)/stage_2.yaml
	$(PY) code/validate_data.py --config $(CFG_DIR)/stage_3.yaml

# Stages chain through their final checkpoints: `make stage3` runs whatever is missing before it, once.
stage1: $(CKPT_OUT)/stage_1/done.json
stage2: $(CKPT_OUT)/stage_2/done.json
stage3: $(CKPT_OUT)/stage_3/done.json

$(CKPT_OUT)/stage_1/done.json: | $(PREREQ_CKPT) $(PREREQ_DATA)
	$(MAKE) --no-print-directory check-ckpt CONFIG=$(CONFIG)
	$(MAKE) --no-print-directory features CONFIG=$(CONFIG)
	$(LAUNCH) code/train.py --config $(CFG_DIR)/stage_1.yaml --ds_config $(call ds_config,stage_1) $(ARGS)
$(CKPT_OUT)/stage_2/done.json: $(CKPT_OUT)/stage_1/done.json
	$(MAKE) --no-print-directory embeddings CONFIG=$(CONFIG)
	$(LAUNCH) code/train.py --config $(CFG_DIR)/stage_2.yaml --ds_config $(call ds_config,stage_2) $(ARGS)
$(CKPT_OUT)/stage_3/done.json: $(CKPT_OUT)/stage_2/done.json
	$(LAUNCH) code/train.py --config $(CFG_DIR)/stage_3.yaml --ds_config $(call ds_config,stage_3) $(ARGS)

finetune: $(CKPT_OUT)/stage_3/done.json
	$(LAUNCH) code/train.py --config $(CFG_DIR)/fine_tuning.yaml --ds_config $(call ds_config,fine_tuning) $(ARGS)

infer:
	$(PY) code/inference.py --config $(CFG_DIR)/stage_3.yaml $(ARGS)

demo: .env-ready
	@$(MAKE) --no-print-directory _demo
_demo:
	$(PY) scripts/demo.py $(ARGS)

test: .env-ready
	@$(MAKE) --no-print-directory _test
_test:
	$(PY) -m pytest -q $(ARGS)

bench:
	$(PY) scripts/bench_all.py $(ARGS)

chaos:
	$(PY) scripts/chaos.py $(ARGS)

clean-tiny:
	rm -rf ckpt/tiny data/toy runs/demo
