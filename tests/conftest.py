import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Importing mpi4py.MPI here must not start an MPI singleton: its environment (PMIX_*, OMPI_*) would reach every
# mpirun a later test starts, which then fails before a rank runs (a unit test that only needs MPI's constants,
# as hpcfl.comm.one_node with a fake communicator does, broke tests/mpi/test_preempt.py run after it).
# Tests that need MPI start it under mpirun, in subprocesses.
import mpi4py  # noqa: E402  (make test installs it)

mpi4py.rc.initialize = mpi4py.rc.finalize = False


def pytest_collection_modifyitems(config, items):
    # The tier follows the folder: tests/unit -> unit, tests/mpi -> mpi.
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "mpi", "slurm", "gpu"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


def hpcfl(*args, timeout=180, cwd=None, env=None):
    """Run the hpcfl CLI in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "hpcfl", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=e)


@pytest.fixture
def need_mpirun():
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: run `make test` (it installs Open MPI)")


def hold(path, round_):
    """The --set that holds a launch at the start of ``round_`` while ``path`` exists (debug.hold): a test
    that must see a run live at a known round waits for that instead of racing the machine's speed."""
    import json

    Path(path).touch()
    return f"debug.hold={{round: {round_}, file: {json.dumps(str(path))}}}"
