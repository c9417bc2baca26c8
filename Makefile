# Quick start: `make demo` and `make test` do all set-up on a fresh machine (a .venv with the CPU build of torch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU machines have torch 2.13.0 on local disk; installing it first keeps pip from fetching a CUDA build.
TORCH_CPU ?= torch==2.13.0
GPU_PY ?= python3

.PHONY: install demo test test-py test-notebooks test-docs test-gpu compile-check lint docs lab bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[dev,notebooks,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m reference.demo

test: test-py test-notebooks test-docs

# the kernels' launches are recorded and one per kernel and signature is compiled for sm_90 (no GPU needed)
test-py: $(STAMP)
	NSA_RECORD_LAUNCHES=.cache/launches.json TRITON_INTERPRET=1 $(PY) -m pytest
	$(PY) scripts/compile_check.py --compile .cache/launches.json --one-per-kernel

test-notebooks: $(STAMP)
	$(PY) -m jupytext --quiet --to ipynb notebooks/*.py
	TRITON_INTERPRET=1 $(PY) -m pytest -p no:randomly --nbmake --overwrite notebooks/*.ipynb -o testpaths=notebooks

test-docs: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet

# On the GPU machine (its own python, no venv): the kernels' tests natively, larger shapes and bf16 included
# (one autotune config per kernel: hypothesis draws many shapes). scripts/gpu_check.sh adds compute-sanitizer.
# on the GPU machine: the kernels' tests natively (one config per kernel), then every autotune config of every
# kernel forced in turn (correct and repeatable); compute-sanitizer runs: scripts/gpu_check.sh sanitize
test-gpu:
	HYPOTHESIS_PROFILE=gpu NSA_AUTOTUNE=0 $(GPU_PY) -m pytest tests/test_optimized_*.py tests/test_benchmarks.py
	$(GPU_PY) scripts/check_configs.py

# On the CPU: compile every kernel launch of the kernel tests for sm_90 with Triton's own compiler (no GPU needed).
compile-check: $(STAMP)
	$(PY) scripts/compile_check.py tests/test_optimized_*.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check reference optimized tests benchmarks examples scripts docs

docs: $(STAMP)
	$(PY) -m mkdocs serve

lab: $(STAMP)
	$(PY) -m jupytext --quiet --to ipynb notebooks/*.py
	$(PY) -m jupyter lab notebooks/

bench:
	$(GPU_PY) -m benchmarks.run --configs default meanpool64 g4 g1 paper_dims --max-minutes 30
	$(GPU_PY) -m benchmarks.decode
	$(GPU_PY) -m benchmarks.bounds

clean:
	rm -rf $(VENV) site out .cache .pytest_cache .hypothesis
