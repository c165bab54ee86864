"""A rank killed for memory is reported as such: the federation runs in a memory cgroup with a limit (what
SLURM's --mem and systemd-run -p MemoryMax= set up), one rank leaks past it, the kernel kills it, and hpcfl
launch names the rank, the limit and what to change instead of "killed by signal 9"."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("need_mpirun")
LIMIT = 1536 << 20  # the three ranks of configs/digits.yaml need ~0.8 GiB together


def memory_cgroup(name):
    """A fresh memory cgroup with LIMIT (v1 memory controller, or v2), or skip saying why there is none."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if (v1 / "memory.limit_in_bytes").exists():
        d = v1 / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(LIMIT))
        if (d / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
            (d / "memory.memsw.limit_in_bytes").write_text(str(LIMIT))
        return d
    if "memory" in (v2 / "cgroup.subtree_control").read_text() if (v2 / "cgroup.subtree_control").exists() else "":
        d = v2 / name
        d.mkdir()
        (d / "memory.max").write_text(str(LIMIT))
        (d / "memory.swap.max").write_text("0")
        return d
    pytest.skip("no writable memory cgroup controller here (v1 memory or v2 with memory enabled)")


def test_a_rank_killed_by_its_cgroups_memory_limit_is_named_with_the_cause(tmp_path):
    cg = memory_cgroup(f"hpcfl-oom-test-{os.getpid()}")
    try:
        procs = cg / "cgroup.procs"
        t = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "hpcfl", "launch", "configs/digits.yaml", "--no-report",
             *[a for s in (f"run.root={tmp_path}", "run.name=oom", "fl.rounds=3", "fl.local_steps=4",
                           "launch.slots=2", "debug.inject_failure={rank: 2, round: 2, mode: oom, memory_mb: 3072}")
               for a in ("--set", s)]],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            preexec_fn=lambda: procs.write_text(str(os.getpid())))  # the launch and every rank it starts
        assert r.returncode != 0, r.stdout
        print(f"oom: the launch ended after {time.monotonic() - t:.0f}s (start-up included)")
        last = r.stderr.strip().splitlines()[-1]
        assert last == (f"hpcfl: rank 2 (site 'hospital-b', rank 0 of 1 in site) was killed for memory (signal 9): its memory limit is "
                        f"1.5 GiB (cgroup {cg}); lower train.batch_size or the ranks per node (launch.slots, "
                        "cluster.cores_per_rank), or give the job more memory (cluster.mem_per_node under SLURM)"), \
            r.stderr
    finally:
        for _ in range(50):  # the cgroup goes once its last process has exited
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.2)
