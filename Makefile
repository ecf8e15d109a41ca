# Set-up and everyday commands. `make test` and `make demo` work on a fresh
# clone with nothing installed: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where a CPU-only torch comes from when no GPU is present (the default PyPI
# build for Linux pulls several GB of CUDA packages).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST := $(PY) -m pytest -q
# `make test TEST_WORKERS=2` runs the modules on two pytest-xdist workers (one
# module per worker at a time: the module-scoped clusters stay whole). One
# process is the default: on 2 cores the parallel run was not reliably faster
# and squeezed the tests that wait a few seconds for Ray (docs: README).
TEST_WORKERS ?= 1

.PHONY: install test test-fast test-ray-range lint demo bench quality gpu-dry-run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch build"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		echo "no GPU: installing the CPU torch build first"; \
		$(PY) -m pip install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null \
		|| $(PY) -m pip install -q --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@# The report test opens the HTML page in a real headless browser.
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		     && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
		|| echo "note: install chromium for the report's browser test (apt-get install chromium)"
	@touch $@

# Everything: real Ray clusters (one private, one multi-node on loopback), an
# S3 server, an MLflow server, a headless browser.
test: install
	$(PYTEST) $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# The quick tier: no Ray cluster, no subprocess, no browser, nothing slow,
# plus one end-to-end smoke test. About a minute on 2 cores.
test-fast: install
	$(PYTEST) -m "smoke or not (ray or subprocess or browser or slow)"

# The fast tier plus a smoke run of train, tune, generate and a submitted job
# on the oldest Ray release pyproject.toml allows, in its own environment
# (.venv-ray-oldest, built on first use). `make test` covers the newest.
test-ray-range:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) .ci/ray_range.sh

lint: install
	$(VENV)/bin/ruff check vae_ray tests benchmarks jobs
	$(VENV)/bin/ruff format --check vae_ray tests benchmarks jobs

demo: install
	$(VENV)/bin/vae-ray demo --out .demo

bench: install
	$(PY) benchmarks/prepare_throughput.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/train_end_to_end.py
	$(PY) benchmarks/tune_overhead.py
	$(PY) benchmarks/generate_small.py

quality: install
	$(PY) benchmarks/quality_mnist.py
	$(PY) benchmarks/quality_defaults.py
	$(PY) benchmarks/quality_nll.py mnist --epochs 10 --iw-samples 500 --limit 500

gpu-dry-run: install
	benchmarks/gpu_suite.sh --dry-run

clean:
	rm -rf $(VENV) .venv-ray-oldest .demo .bench .pytest_cache
