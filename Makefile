# contralateral: two commands on a fresh machine -- `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# timm imports torchvision, and PyPI's torchvision only loads beside the matching torch build,
# so torch and torchvision are pinned as a pair (see README "Install").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO ?= demo
DEMO_STUDIES ?= 40
DEMO_SEED ?= 7
STUDY_SEEDS ?= 0 1 2
STUDY_STEPS ?= 60
STUDY_OUT ?= $(DEMO)/study

.PHONY: venv demo test bench study clean-demo

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m pipelines.demo --out $(DEMO) --studies $(DEMO_STUDIES) --seed $(DEMO_SEED)

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

# every method x $(STUDY_SEEDS) on the demo's shards with the demo's budget (run `make demo` first: its seed-0
# runs are reused); resumes when rerun. Longer: make study STUDY_STEPS=300 STUDY_OUT=demo/study-300
study: venv
	$(BIN)/python -m pipelines.study --shards $(DEMO)/shards --manifests $(DEMO)/manifests --out $(STUDY_OUT) \
		$(foreach s,$(STUDY_SEEDS),--seeds $(s)) --steps $(STUDY_STEPS) --batch-size 32 --num-workers 1 \
		--n-boot 200 --root $(DEMO)/archive

bench: venv
	$(BIN)/python benchmarks/prep_bench.py
	$(BIN)/python benchmarks/loader_bench.py
	$(BIN)/python benchmarks/train_bench.py

clean-demo:
	rm -rf $(DEMO)
