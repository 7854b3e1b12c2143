# nextgpt-train: one target per step. Targets run inside the project's environment without activation.
#   make env check-ckpt features embeddings stage1 stage2 stage3     (real checkpoints, see README)
#   make demo                                                         (tiny models + toy data, CPU, minutes)
#   make test / make test-all                                         (unit + smoke / every test)
# Variables: CONFIG=tiny (tiny configs), NUM_GPUS=N, HOSTFILE=path (multi-node; NODE_RANK=R MASTER_ADDR=host without
#   ssh), STAGE=N (make doctor), DS_CONFIG=path, ARGS="--set k=v",
#   MASTER_PORT=N (default: a free port per launch), MAKE_ENV_SCRIPT=path (what `make env` runs)

SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CONFIG ?=
NUM_GPUS ?=
HOSTFILE ?=
ARGS ?=

# --- environment: .venv, else the conda env `nextgpt`, else python3 ----------------------------------------------
# scripts/python.sh picks the interpreter each time a recipe RUNS. Deciding here, when the Makefile is parsed, would
# make `make env stage1 stage2 stage3` on a fresh clone run the stages with the system python (no torch yet).
ENV_NAME ?= nextgpt
export ENV_NAME
MAKE_ENV_SCRIPT ?= scripts/make_env.sh
PY := $(ROOT)/scripts/python.sh
# DeepSpeed's runner defaults to port 29500, so two trainings on one machine collide: a free port per launch.
DEEPSPEED = $(PY) -m nextgpt.launch --master_port $$($(ROOT)/scripts/free_port.sh)

# --- which configs -------------------------------------------------------------------------------------------
ifeq ($(CONFIG),tiny)
  CFG_DIR := code/config/tiny
  DS_DIR_DEFAULT := cpu
  DATA_ROOT := data/toy
  PREREQ_CKPT := ckpt/tiny/.complete
  PREREQ_DATA := data/toy/.complete
else
  CFG_DIR := code/config
  DS_DIR_DEFAULT :=
  DATA_ROOT := data
  PREREQ_CKPT :=
  PREREQ_DATA :=
endif

# The features / embeddings a stage needs get only the `--set key=value` overrides of ARGS (e.g. another data.root),
# not train.py's own flags.
set_args = $(foreach kv,$(filter-out -%,$(1)),$(if $(findstring =,$(kv)),--set $(kv)))
SET_ARGS = $(call set_args,$(ARGS))

# --- where each stage writes: asked of the config (YAML + --set), never mirrored here -----------------------------
# A `--set train.output_dir=DIR` in ARGS is the folder of the stage you name: `make stage2 ARGS="--set
# train.output_dir=DIR"` trains stage 2 into DIR and looks for DIR/done.json; the stages it needs first keep their
# own folders (they get ARGS without that override). Relative values are relative to the repository root, where
# make runs (as train.py resolves them). The config is asked when a recipe RUNS (`make env stage1` on a fresh clone
# has no python yet when the Makefile is parsed): `stageN` asks, then runs the chain `stageN-chain` with the folders.
ARGS_NO_OUT = $(filter-out --set-output-dir=%,$(subst --set train.output_dir=,--set-output-dir=,$(ARGS)))
TOP_STAGE ?= $(lastword $(sort $(filter stage1 stage2 stage3,$(MAKECMDGOALS))))
stage_args = $(if $(filter stage$(1),$(TOP_STAGE)),$(ARGS),$(ARGS_NO_OUT))
# a shell command substitution (it runs in the recipe): stage N's train.output_dir
ask_output_dir = $$($(PY) -m nextgpt.config --print train.output_dir --config $(CFG_DIR)/stage_$(1).yaml \
                   $(call set_args,$(call stage_args,$(1))))
ASK_STAGE_DIRS = out_1="$(call ask_output_dir,1)" && out_2="$(call ask_output_dir,2)" && \
                 out_3="$(call ask_output_dir,3)"
CHECK_STAGE_DIRS = { [ -n "$$out_1" ] && [ -n "$$out_2" ] && [ -n "$$out_3" ] || \
                   { echo "error: the config named no train.output_dir for a stage" >&2; false; }; }
PASS_STAGE_DIRS = OUT_1="$$out_1" OUT_2="$$out_2" OUT_3="$$out_3" TOP_STAGE=$(TOP_STAGE)

# DeepSpeed config per stage: code/dsconfig/stage_N.json on GPUs, cpu.json for CONFIG=tiny; DS_CONFIG overrides.
ds_config = $(if $(DS_CONFIG),$(DS_CONFIG),$(if $(DS_DIR_DEFAULT),code/dsconfig/cpu.json,code/dsconfig/$(1).json))

# Launcher: `deepspeed` with --num_gpus / --hostfile when given; a plain single process otherwise on CPU.
# Several nodes (README "Multi-GPU and multi-node"; a hostfile of `<host> slots=<GPUs>` lines, one shared folder
# for outputs, caption embeddings and features: every rank checks it at start):
#   make stage1 HOSTFILE=hostfile MASTER_PORT=29500                  # on the first host: DeepSpeed starts every
#                                                                      node's launcher through pdsh + ssh
#   make stage1 HOSTFILE=hostfile NODE_RANK=R MASTER_ADDR=<first host> MASTER_PORT=29500   # on each node R, no ssh
#                                                                      (DeepSpeed's --no_ssh --node_rank R)
#   torchrun --nnodes N --nproc_per_node G --node_rank R --rdzv_backend c10d --rdzv_endpoint <first host>:29500 \
#       code/train.py --config ...                                     # the same without DeepSpeed's launcher
NODE_RANK ?=
MASTER_ADDR ?=
NODES = $(if $(HOSTFILE),--hostfile $(HOSTFILE),) $(if $(NODE_RANK),--no_ssh --node_rank $(NODE_RANK) --master_addr $(MASTER_ADDR),)
LAUNCH = $(DEEPSPEED) $(NODES) $(if $(NUM_GPUS),--num_gpus $(NUM_GPUS),$(if $(DS_DIR_DEFAULT),--num_gpus 1,))

.PHONY: tiny-trained test-heavy help env check-ckpt doctor tiny toy-data embeddings features validate stage1 stage2 stage3 stage1-chain \
        stage2-chain stage3-chain finetune finetune-chain finetune-own infer app export data-report eval demo test \
        test-all bench chaos clean-tiny

help:
	@sed -n '1,6p' Makefile

env:
	@bash $(MAKE_ENV_SCRIPT) && touch .env-ready

# `make demo` / `make test` on a fresh clone set up the environment first (and again when requirements or
# pyproject.toml change: an existing clone then re-runs make env and gets the editable install).
.env-ready: requirements.txt env.yml pyproject.toml
	@bash $(MAKE_ENV_SCRIPT) && touch .env-ready

check-ckpt:
	$(PY) scripts/check_ckpt.py --config $(CFG_DIR)/stage_3.yaml

# Would `make stage$(STAGE)` start here? Devices, bf16, memory, ops DeepSpeed would compile, backend, disk, the
# hostfile's nodes (ssh, one shared folder), check-ckpt: each problem one line with its fix (scripts/doctor.py).
STAGE ?= 1
doctor:
	$(PY) scripts/doctor.py --config $(CFG_DIR)/stage_$(STAGE).yaml --ds_config $(call ds_config,stage_$(STAGE)) $(if $(HOSTFILE),--hostfile $(HOSTFILE),) $(if $(NUM_GPUS),--num_gpus $(NUM_GPUS),) $(SET_ARGS)

tiny: ckpt/tiny/.complete
ckpt/tiny/.complete:
	$(PY) scripts/tiny/make_tiny_ckpt.py --out ckpt/tiny --data data/toy

# Opt-in: ImageBind and the decoders trained on the toy world (about an hour on 2 CPU cores; keeps parts already
# trained, so an interrupted run resumes per component). README "The toy world, trained and judged".
tiny-trained:
	$(PY) scripts/tiny/make_tiny_ckpt.py --out ckpt/tiny --data data/toy --train

toy-data: data/toy/.complete
data/toy/.complete:
	$(PY) scripts/tiny/make_toy_data.py --out data/toy

# Caption embeddings (stage 2/3 targets) and ImageBind features (stage-1 cache) for the selected config.
# NUM_GPUS / HOSTFILE: one process per GPU / node slot through the DeepSpeed launcher, each computing a disjoint
# share of the batches (the share that finishes last writes the one manifest); otherwise one plain process.
PRECOMPUTE = $(if $(NUM_GPUS)$(HOSTFILE),$(DEEPSPEED) $(NODES) $(if $(NUM_GPUS),--num_gpus $(NUM_GPUS),),$(PY))
embeddings: $(PREREQ_CKPT) $(PREREQ_DATA)
	$(PRECOMPUTE) code/process_embeddings.py --config $(CFG_DIR)/stage_3.yaml --all $(ARGS)
features: $(PREREQ_CKPT) $(PREREQ_DATA)
	$(PRECOMPUTE) code/process_embeddings.py --config $(CFG_DIR)/stage_1.yaml --all --features $(ARGS)

validate:
	$(PY) code/validate_data.py --config $(CFG_DIR)/stage_1.yaml $(ARGS)
	$(PY) code/validate_data.py --config $(CFG_DIR)/stage_2.yaml $(ARGS)
	$(PY) code/validate_data.py --config $(CFG_DIR)/stage_3.yaml $(ARGS)

# Stages chain through their final checkpoints: `make stage3` runs whatever is missing before it, once.
# `make stage1 stage2 stage3` is one chain in one make (each stage once): the first of those goals runs them all.
STAGE_GOALS = $(or $(filter stage1 stage2 stage3 finetune,$(MAKECMDGOALS)),$@)
stage1 stage2 stage3 finetune:
	@$(if $(filter $@,$(firstword $(STAGE_GOALS))),$(ASK_STAGE_DIRS) && $(CHECK_STAGE_DIRS) && \
	  $(MAKE) --no-print-directory $(addsuffix -chain,$(STAGE_GOALS)) $(PASS_STAGE_DIRS),true)

ifdef OUT_1
stage1-chain: $(OUT_1)/done.json
stage2-chain: $(OUT_2)/done.json
stage3-chain: $(OUT_3)/done.json

$(OUT_1)/done.json: | $(PREREQ_CKPT) $(PREREQ_DATA)
	$(MAKE) --no-print-directory check-ckpt CONFIG=$(CONFIG)
	$(MAKE) --no-print-directory features CONFIG=$(CONFIG) ARGS='$(call set_args,$(ARGS_NO_OUT))'
	$(LAUNCH) code/train.py --config $(CFG_DIR)/stage_1.yaml --ds_config $(call ds_config,stage_1) $(call stage_args,1)
$(OUT_2)/done.json: $(OUT_1)/done.json
	$(MAKE) --no-print-directory embeddings CONFIG=$(CONFIG) ARGS='$(call set_args,$(ARGS_NO_OUT))'
	$(LAUNCH) code/train.py --config $(CFG_DIR)/stage_2.yaml --ds_config $(call ds_config,stage_2) $(call stage_args,2)
$(OUT_3)/done.json: $(OUT_2)/done.json
	$(LAUNCH) code/train.py --config $(CFG_DIR)/stage_3.yaml --ds_config $(call ds_config,stage_3) $(call stage_args,3)

finetune-chain: $(OUT_3)/done.json
	$(LAUNCH) code/train.py --config $(CFG_DIR)/fine_tuning.yaml --ds_config $(call ds_config,fine_tuning) $(ARGS)
endif

# Fine-tune the released model on your own data (code/config/finetune_own.yaml, data/README.md): the caption
# embeddings of its datasets, then LoRA (+ projectors) training. train.py picks its default dsconfig (gpu.json on
# GPUs, cpu.json on the CPU; the 8-bit AdamW comes from code, not from a JSON) unless DS_CONFIG is given.
finetune-own: $(PREREQ_CKPT)
	$(PY) code/process_embeddings.py --config $(CFG_DIR)/finetune_own.yaml --all $(SET_ARGS)
	$(LAUNCH) code/train.py --config $(CFG_DIR)/finetune_own.yaml $(if $(DS_CONFIG),--ds_config $(DS_CONFIG),) $(ARGS)

infer:
	$(PY) code/inference.py --config $(CFG_DIR)/stage_3.yaml $(ARGS)

# Web demo (code/app.py): a Gradio chat on http://127.0.0.1:7860 (ARGS="--ckpt DIR --port N").
app:
	$(PY) code/app.py --config $(CFG_DIR)/stage_3.yaml $(ARGS)

# Export a checkpoint (code/export.py): EXPORT_FORMAT=hf a merged Hugging Face folder (LoRA + token rows merged,
# tokenizer with the 38 tokens, projectors.safetensors, model card), legacy the original's pytorch_model.pt.
EXPORT_CKPT ?= "$(call ask_output_dir,3)"
EXPORT_FORMAT ?= hf
EXPORT_OUT ?= exports/$$(basename $(EXPORT_CKPT))-$(EXPORT_FORMAT)
export:
	$(PY) code/export.py --ckpt $(EXPORT_CKPT) --out $(EXPORT_OUT) --format $(EXPORT_FORMAT) $(ARGS)

# What each stage trains on: modality mix, counts, word/token-length histograms (runs/data_report/<config>.png) and
# the missing/corrupt records (cheap checks; `make validate` decodes every file). REPORT_CONFIGS: which configs.
REPORT_CONFIGS ?= $(CFG_DIR)/stage_1.yaml $(CFG_DIR)/stage_2.yaml $(CFG_DIR)/stage_3.yaml
data-report:
	@for config in $(REPORT_CONFIGS); do $(PY) code/validate_data.py --config $$config --no-decode --report $(ARGS) || exit $$?; done

# Held-out evaluation of checkpoints -> runs/eval/<name>/report.md (code/evaluate.py). CKPTS: what to compare,
# default the base model and every stage's final checkpoint; CONFIG=tiny evaluates 8 records per dataset, then
# judges what the toy media show (scripts/tiny/judge_eval.py -> runs/eval/tiny/judged/judged.md).
CKPTS ?= base "$(call ask_output_dir,1)" "$(call ask_output_dir,2)" "$(call ask_output_dir,3)"
eval:
	$(PY) code/evaluate.py --config $(CFG_DIR)/eval.yaml --ckpt $(CKPTS) --out runs/eval/$(if $(CONFIG),$(CONFIG),default) $(if $(filter tiny,$(CONFIG)),--limit 8,) $(ARGS)
	$(if $(filter tiny,$(CONFIG)),$(PY) scripts/tiny/judge_eval.py --config $(CFG_DIR)/eval.yaml --ckpt $(CKPTS) --out runs/eval/tiny/judged,)

demo: .env-ready
	$(PY) scripts/demo.py $(ARGS)

# make test: tests/unit (in-process, mirrors code/nextgpt) + one end-to-end smoke; make test-all: everything
# (tests/e2e: stages, resume, ranks, precompute, inference, the app in Chromium, make chains, demo; what CI runs).
test: .env-ready
	$(PY) -m pytest -q $(ARGS) -m "not slow"

test-all: .env-ready
	$(PY) -m pytest -q $(ARGS) -m "not heavy"

# the minutes-long checks kept out of CI's time budget (tests marked heavy: more node / launcher forms, pdsh, toy
# decoder training); run them before a release
test-heavy: .env-ready
	$(PY) -m pytest -q $(ARGS) -m heavy

bench:
	$(PY) dev/bench/bench_all.py $(ARGS)

chaos:
	$(PY) dev/chaos/run.py $(ARGS)

clean-tiny:
	rm -rf ckpt/tiny data/toy runs/demo
