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

.PHONY: demo test lint format reports bench bench-gpu bench-gpu-tests bench-gpu-benchmarks gpu-setup clean

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
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS)

# Every study under experiments/: its report again from its tracked summary (zoo report).
reports: $(STAMP)
	$(VENV)/bin/zoo report

bench: $(STAMP)
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done

# On a lent GPU machine: the gpu-marked tests and every benchmark, JSON under benchmarks/results/.
# That machine has no network and its own python3 with CUDA torch and triton, so nothing is
# fetched: wheels of our pinned versions travel in .whl/ (benchmarks/README.md says how).
GPU_PYTHON ?= python3
# The files holding gpu-marked tests (collecting only these keeps dev-only imports out).
GPU_TESTS ?= tests/test_gpu.py tests/layers/test_moe.py tests/kernels tests/test_training.py
# The benchmark scripts (benchmarks/<name>.py), run by `make bench` on CPU and `make bench-gpu`.
BENCHMARKS ?= cpu_models moe_layer train_step grouped_gemm scans decode ssm_conv mixers parallel
# Pure-Python pins and pydantic-core (one wheel per CPython version in .whl/, pip picks its own).
GPU_WHEELS ?= transformers huggingface-hub pydantic pydantic-core annotated-types \
	typing-inspection typing-extensions typer
gpu-setup:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install --quiet --upgrade --no-index --no-deps --find-links .whl $(GPU_WHEELS); fi
	$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
	@# fla, the optional baseline of scans.py and decode.py: used when its wheel was fetched.
	@if ls .whl/fla_core-*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --find-links .whl fla-core einops \
		|| echo "fla not installed: the benchmarks record it so"; fi
	@# mamba-ssm and causal-conv1d, ssm_conv.py's CUDA baselines: used when prebuilt wheels matching
	@# the machine's torch and CUDA were fetched (benchmarks/README.md).
	@for pkg in mamba_ssm causal_conv1d; do \
		if ls .whl/$$pkg-*.whl >/dev/null 2>&1; then \
			$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --find-links .whl $$pkg einops \
			|| echo "$$pkg not installed: ssm_conv.py records it so"; fi; done

RUN_GPU_TESTS = $(GPU_PYTHON) -m pytest -m gpu -q -p no:cacheprovider $(GPU_TESTS)
# Every benchmark runs even when an earlier one fails (a lent GPU is rare); the failed ones are
# listed at the end and fail the target. On the lent GPU ($OUT set) each result, partial ones
# included, is also written into $OUT (benchmarks/common.py), which is all that comes back.
RUN_GPU_BENCHMARKS = failed=""; for b in $(BENCHMARKS); do \
		echo "== benchmarks/$$b.py --device cuda"; \
		BENCH_COPY_DIR="$${OUT:-}" $(GPU_PYTHON) benchmarks/$$b.py --device cuda \
			|| failed="$$failed $$b"; done; \
	[ -z "$$failed" ] || { echo "benchmarks that failed:$$failed"; false; }

# A device command may run 10 minutes: a session can split its batch into the tests and the
# benchmarks, or a subset, e.g. `make bench-gpu-benchmarks BENCHMARKS="scans decode"`.
bench-gpu-tests: gpu-setup
	$(RUN_GPU_TESTS)

bench-gpu-benchmarks: gpu-setup
	@$(RUN_GPU_BENCHMARKS)

bench-gpu: gpu-setup
	@status=0; $(RUN_GPU_TESTS) || status=1; $(RUN_GPU_BENCHMARKS) || status=1; exit $$status

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
