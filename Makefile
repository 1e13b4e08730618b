# contralateral: two commands on a fresh machine -- `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# timm imports torchvision, and PyPI's torchvision only loads beside the matching torch build,
# so torch and torchvision are pinned as a pair (see README "Install").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO ?= demo
DEMO_SEED ?= 7
# methods the demo trains and compares (empty: the demo's default four, pipelines/demo.py DEMO_METHODS), e.g. "random siamese-hard ld"
DEMO_METHODS ?=
STUDY_SEEDS ?= 0 1 2
STUDY_STEPS ?= 60
# the study's own archive: 250 studies at the generator's 60 % lesion prevalence put >= 30 lesion studies in
# the test split, enough for study-level confidence intervals (the 40-study demo has 5)
STUDY_STUDIES ?= 250
STUDY_DIR ?= study250
STUDY_OUT ?= $(STUDY_DIR)/study
# label fractions at which `make study` also fine-tunes every run's encoder (empty: none), e.g. "0.01 0.1 1"
STUDY_FINETUNE ?=
# methods of `make study` (empty: all five); STUDY_DETECTION_ONLY=1 evaluates detection AUCs only, no probes
STUDY_METHODS ?=
STUDY_DETECTION_ONLY ?=
ABLATION_STEPS ?= 300
ABLATION_SEEDS ?= 0 1 2
ABLATION_CURVE ?= 60 300 1000
# contrast-detail benchmark (docs/CONTRAST_DETAIL.md): archive seed and size, trials per cell, pretraining budget
CD_DIR ?= cd
CD_SEED ?= 0
CD_SIZE ?= small
CD_TRIALS ?= 45
CD_STEPS ?= 300
CD_TRAIN_SEED ?= 0
CD_METHODS ?= random siamese-hard siamese-soft simclr ld
CD_BOOT ?= 2000
# the soft-label study (issue 19, pre-registered in docs/RESULTS.md) on a finished contrast-detail folder
SOFT_CD ?= $(CD_DIR)
SOFT_OUT ?= softstudy
SOFT_SEEDS ?= 0 1 2
SOFT_STEPS ?= 300
SOFT_CURVE ?= 60 300 1000
# what an added registration error does to the demo's detection (benchmarks/registration_tolerance.py)
TOL_DIR ?= tolerance
TOL_OFFSETS ?= 0 2 4 8
TOL_STEPS ?= 60

.PHONY: venv demo test bench study study-archive ablation cd softlabel-study tolerance clean-demo

# --no-compile: byte-compiling every file of torch and its neighbours at install costs minutes of CPU on 2 cores;
# Python compiles the modules a command imports on first use instead (docs/PERFORMANCE.md "End to end")
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m pipelines.demo --out $(DEMO) --seed $(DEMO_SEED) $(foreach m,$(DEMO_METHODS),--methods $(m))

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

# every method x $(STUDY_SEEDS) with the demo's budget (60 steps, batch 32) on a $(STUDY_STUDIES)-study archive of its own
# (study-archive); every stage resumes when rerun.
# Longer: make study STUDY_STEPS=300 STUDY_OUT=study250/study-300
study: venv study-archive
	$(BIN)/python -m pipelines.study --shards $(STUDY_DIR)/shards --manifests $(STUDY_DIR)/manifests \
		--out $(STUDY_OUT) $(foreach s,$(STUDY_SEEDS),--seeds $(s)) --steps $(STUDY_STEPS) --batch-size 32 \
		--num-workers 1 --root $(STUDY_DIR)/archive $(foreach f,$(STUDY_FINETUNE),--finetune-fractions $(f)) \
		$(foreach m,$(STUDY_METHODS),--methods $(m)) $(if $(STUDY_DETECTION_ONLY),--detection-only)

# the study's own generator 2.0 archive and its shards at the demo's scale (0.4 mm/px, 64-px patches); both resume
study-archive: venv
	test -f $(STUDY_DIR)/archive/SHA256SUMS.txt || $(BIN)/prep synth --out $(STUDY_DIR)/archive \
		--studies $(STUDY_STUDIES) --seed $(DEMO_SEED) --overwrite
	$(BIN)/prep build-shards --dataset vindr --root $(STUDY_DIR)/archive --out $(STUDY_DIR)/shards \
		--manifests $(STUDY_DIR)/manifests --build study --mm-per-px 0.4 --patch-px 64 --shard-max-samples 256

# siamese-soft with one part changed at a time (docs/RESULTS.md "Ablations"), SimCLR and LD at the same budget, and learning curves of
# siamese-soft, siamese-hard and random at $(ABLATION_CURVE) steps, on the study's archive; resumes when rerun.
ablation: venv study-archive
	$(BIN)/python -m pipelines.ablation --shards $(STUDY_DIR)/shards --manifests $(STUDY_DIR)/manifests \
		--out $(STUDY_DIR)/ablation --steps $(ABLATION_STEPS) $(foreach s,$(ABLATION_SEEDS),--seeds $(s)) \
		$(foreach n,$(ABLATION_CURVE),--curve-steps $(n))

# the contrast-detail benchmark: archive -> shards -> pretrain each method once -> matched trial patches -> scores
# -> $(CD_DIR)/cd.md, cd_curves.png, cd.json; resumes when rerun.
cd: venv
	$(BIN)/python -m pipelines.contrast_detail --out $(CD_DIR) --seed $(CD_SEED) --size $(CD_SIZE) \
		--trials-per-cell $(CD_TRIALS) --steps $(CD_STEPS) --train-seed $(CD_TRAIN_SEED) \
		$(foreach m,$(CD_METHODS),--methods $(m)) --n-boot $(CD_BOOT)

# siamese-hard and siamese-soft x --gmm-mode x --pair-photometric on $(SOFT_CD)'s shards and cached trial patches
# (nothing rebuilt) -> $(SOFT_OUT)/softlabel_study.md and .json; resumes when rerun.
softlabel-study: venv
	$(BIN)/python -m pipelines.softlabel_study --cd $(SOFT_CD) --out $(SOFT_OUT) --steps $(SOFT_STEPS) \
		$(foreach s,$(SOFT_SEEDS),--seeds $(s)) $(foreach n,$(SOFT_CURVE),--curve-steps $(n))

# the demo's contrast-detail job once per registration offset (every fit moved that many mm after QC, in training and
# in the test patches) -> $(TOL_DIR)/tolerance.md and .json; resumes when rerun.
tolerance: venv
	$(BIN)/python benchmarks/registration_tolerance.py --out $(TOL_DIR) --offsets $(TOL_OFFSETS) --steps $(TOL_STEPS)

bench: venv
	$(BIN)/python benchmarks/prep_bench.py
	$(BIN)/python benchmarks/loader_bench.py
	$(BIN)/python benchmarks/train_bench.py

clean-demo:
	rm -rf $(DEMO)
