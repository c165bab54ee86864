# The two commands (README.md): `make demo` and `make test`.
# Both install whatever is missing first (scripts/install.sh is idempotent and
# caches the Horovod build), so they work on a fresh Debian/Ubuntu machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
HPCFL  := $(VENV)/bin/hpcfl
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-mpi bench clean

install:
	@bash scripts/install.sh

demo: install
	$(HPCFL) launch configs/quickstart.yaml --restart

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-mpi: install
	$(PY) -m pytest -m mpi $(PYTEST_ARGS)

bench: install
	$(PY) bench/federation_overhead.py

clean:
	rm -rf runs .pytest_cache
