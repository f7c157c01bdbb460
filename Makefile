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
# without being asked (see README, Run folders)
demo: setup
	$(PY) -m mmcam_fast.train --data synthetic --backbone resnet18 --out runs/demo --overwrite

test: setup
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,dali]'
	$(PY) -m ruff check mmcam_fast kernels tests benchmarks
	$(PY) -m pytest -q
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/interpret

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only

experiments: setup
	$(PY) -m mmcam_fast.experiments --src $(SHARED_DATA)/tiny-imagenet-5
