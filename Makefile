# hybrid-zoo: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+).
#
# torch comes first, on its own: `torch==2.13.0` takes the local CPU wheel on our machines, while
# an unpinned torch pulls GBs of CUDA packages. Override for other machines, e.g.
#   make test TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>"
# A GPU machine can use any CUDA build: make bench-gpu TORCH_SPEC="torch==2.13.0".

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench bench-gpu clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/zoo demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS)

bench: $(STAMP)
	$(PY) benchmarks/cpu_models.py
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/grouped_gemm.py
	$(PY) benchmarks/scans.py
	$(PY) benchmarks/decode.py

# On a lent GPU machine: the gpu-marked tests and every benchmark, JSON under benchmarks/results/.
# That machine has no network and its own python3 with CUDA torch and triton, so nothing is
# fetched: wheels of our pinned versions travel in .whl/ (benchmarks/README.md says how).
GPU_PYTHON ?= python3
# The files holding gpu-marked tests (collecting only these keeps dev-only imports out).
GPU_TESTS ?= tests/test_gpu.py tests/layers/test_moe.py tests/kernels tests/test_training.py
# Pure-Python pins and pydantic-core (one wheel per CPython version in .whl/, pip picks its own).
GPU_WHEELS ?= transformers huggingface-hub pydantic pydantic-core annotated-types \
	typing-inspection typer
bench-gpu:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --find-links .whl $(GPU_WHEELS); fi
	$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
	@# fla, the optional baseline of scans.py and decode.py: used when its wheel was fetched.
	@if ls .whl/fla_core-*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --find-links .whl fla-core einops \
		|| echo "fla not installed: the benchmarks record it so"; fi
	$(GPU_PYTHON) -m pytest -m gpu -q -p no:cacheprovider $(GPU_TESTS)
	$(GPU_PYTHON) benchmarks/cpu_models.py --device cuda
	$(GPU_PYTHON) benchmarks/moe_layer.py --device cuda
	$(GPU_PYTHON) benchmarks/train_step.py --device cuda
	$(GPU_PYTHON) benchmarks/grouped_gemm.py --device cuda
	$(GPU_PYTHON) benchmarks/scans.py --device cuda
	$(GPU_PYTHON) benchmarks/decode.py --device cuda

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
