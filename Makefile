# The two entry commands of the README. VENV may point outside the checkout (CI keeps it in a cache).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q

.PHONY: setup demo test lint bench experiments
$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'

demo: setup
	$(PY) -m mmcam_fast.train --data synthetic --backbone resnet18 --out runs/demo

test: setup
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,dali]'
	$(PY) -m ruff check mmcam_fast kernels tests benchmarks
	$(PY) -m pytest -q
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/interpret

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only

experiments: setup
	$(PY) -m mmcam_fast.experiments
