# The two commands (README.md): `make demo` and `make test`.
# Both install whatever is missing first (scripts/install.sh is idempotent and
# caches the Horovod build), so they work on a fresh Debian/Ubuntu machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
HPCFL  := $(VENV)/bin/hpcfl
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-mpi test-slurm bench clean

install:
	@bash scripts/install.sh

demo: install
	$(HPCFL) launch configs/quickstart.yaml --restart

# Each target installs what its tests need: the slurm tier a local SLURM cluster, the mpi tier a browser.
test: export HPCFL_WITH_SLURM = 1
test: export HPCFL_WITH_BROWSER = 1
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slurm: export HPCFL_WITH_SLURM = 1
test-slurm: install
	$(PY) -m pytest -m slurm $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-mpi: export HPCFL_WITH_BROWSER = 1
test-mpi: install
	$(PY) -m pytest -m mpi $(PYTEST_ARGS)

bench: install
	$(PY) bench/federation_overhead.py

clean:
	rm -rf runs .pytest_cache
