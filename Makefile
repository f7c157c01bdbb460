# The README's two entry commands, `make demo` and `make test`, build the environment in .venv inside
# the checkout (torch and torchvision pinned in pyproject.toml) and then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q
# the project's real data (tests, benchmarks, experiments): shared/data beside the checkout
SHARED_DATA ?= $(or $(MMCAM_SHARED_DATA),../shared/data)

.PHONY: setup demo test lint bench experiments
$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'

# --overwrite: the demo's run folder is the demo's own; any other run folder is never overwritten
# without being asked (see docs/usage.md, Run folders never lose work)
demo: setup
	$(PY) -m mmcam_fast.train --data synthetic --backbone resnet18 --out runs/demo --overwrite

test: setup
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,dali]'
	$(PY) -m ruff check mmcam_fast kernels tests benchmarks
	$(PY) -m pytest -q
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/interpret

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only

# The Tiny-ImageNet WSOL study (docs/results.md): CAM against MinMaxCAM fine-tuned from the committed
# pretrained weights (experiments/pretrained/) on WSOL-20 and Tiny-ImageNet-5. Resumable: a run whose
# result row (experiments/tiny-imagenet-wsol/rows/) exists is skipped. About 6 h of a 2-core AVX512-BF16
# machine (measured; docs/results.md), about 5x that on an AVX2-only CPU, where it runs in fp32.
experiments: setup
	$(PY) -m mmcam_fast.tiny_wsol study --shared $(SHARED_DATA)

# The earlier study: ResNet18-CAM from scratch on Tiny-ImageNet-5 (experiments/tiny-imagenet-5/)
experiments-scratch: setup
	$(PY) -m mmcam_fast.scratch_study --src $(SHARED_DATA)/tiny-imagenet-5

# The pretrained weights the study fine-tunes from (committed; about 90 min of a 2-core machine per
# backbone; resumable with the same command): 172 Tiny ImageNet classes, labels only, at 64 px.
TINY192 := $(SHARED_DATA)/tiny-imagenet-192
PRETRAIN = $(PY) -m mmcam_fast.pretrain --data-root runs/data/pretrain172 --resume auto
.PHONY: pretrain experiments-scratch
pretrain: setup
	$(PY) -m mmcam_fast.prepare tiny-imagenet --src $(TINY192)/tiny-imagenet-192.tar.gz \
		--classes $(TINY192)/pretrain172.txt --labels-only --out runs/data/pretrain172
	$(PRETRAIN) --arch resnet18 --epochs 8 --out runs/pretrain/resnet18 \
		--export experiments/pretrained/resnet18-172.pth
	$(PRETRAIN) --arch mobilenet_v2 --epochs 6 --out runs/pretrain/mobilenet_v2 \
		--export experiments/pretrained/mobilenet_v2-172.pth

# `make gpu-check`: the GPU paths proven on this machine's GPU in under 8 minutes, stage by stage
# (benchmarks/gpu_check.py, docs/gpu-check.md). Arguments go through ARGS: `make gpu-check ARGS=--dry-run`
# (the same stages on the CPU with tiny shapes), `make gpu-check ARGS="--stages c,e --budget e=600"`.
# No setup step: it checks the environment as it is installed.
.PHONY: gpu-check
gpu-check:
	$(PY) benchmarks/gpu_check.py $(ARGS)

# Mutation testing (docs/mutation.md): cosmic-ray over the method's core modules, each with its own
# test files as the runner, in a copy of the checkout (build/mutation/tree). Not part of `make test`
# or CI: about an hour on 2 cores. A fixed sample of mutants per module (SAMPLE in tools/mutation.py);
# MUTATION_SAMPLE=0 runs them all, MUTATION_MODULES="sampler level_tree" some modules,
# MUTATION_ARGS=--survivors the last run's survivors only. Results: build/mutation/<module>.txt
MUTATION_MODULES ?=
MUTATION_ARGS ?=
.PHONY: mutation
mutation: setup
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,mutation]'
	nice -n 10 $(PY) tools/mutation.py $(MUTATION_ARGS) $(MUTATION_MODULES)
