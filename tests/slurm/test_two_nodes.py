"""Two SLURM nodes for real on one machine: hpcfl's rendered job spans them, MPI over TCP between them.

scripts/local_slurm_2node.sh builds the cluster: nodes hpcfl-n1 and hpcfl-n2 are network + UTS
namespaces with their own addresses and hostnames (and a node-local /tmp, so run directories live in
/var/tmp, shared like a cluster's filesystem). Each job is submitted with `hpcfl submit`, its ranks
record the host they ran on in manifest.json, and its final weights are compared with a one-node
`hpcfl launch` of the same config: the federation must not depend on where its ranks ran.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, hpcfl
from hpcfl.checkpoint import load_checkpoint

SCRIPT = ROOT / "scripts" / "local_slurm_2node.sh"
CONFIG = "configs/cluster-2node-local.yaml"
N1, N2 = "hpcfl-n1", "hpcfl-n2"


@pytest.fixture(scope="module")
def cluster(request):
    """The two-node cluster for this module's jobs, then gone (its daemons and namespaces), and a run root
    outside /tmp (each node has its own /tmp), removed unless a test of the module failed (its runs' logs
    and heartbeats are what tell why) or HPCFL_KEEP_RUNS is set (to compare a passing run's round times)."""
    if os.geteuid() != 0:
        pytest.skip("the two-node tier creates network namespaces and starts slurmd: it needs root")
    if ROOT.resolve().is_relative_to("/tmp"):
        pytest.skip(f"the checkout {ROOT} is under /tmp, which each node of the two-node cluster has of its own "
                    "(as on a real cluster): clone outside /tmp to run this tier")
    for cmd, pkg in (("slurmctld", "slurm-wlm"), ("munged", "munge"), ("ip", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(cmd) is None:
            pytest.fail(f"{cmd} not found: run `make test`, which installs {pkg} (HPCFL_WITH_SLURM=1)")
    r = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    if r.returncode == 77:
        pytest.skip(f"no two-node cluster here: {r.stderr.strip()}")
    env = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True).stdout
    conf = env.strip().split("SLURM_CONF=")[1]
    root = Path(tempfile.mkdtemp(prefix="hpcfl-2node-", dir="/var/tmp"))
    failed = request.session.testsfailed
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield {"SLURM_CONF": conf}, root
    finally:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)
        if request.session.testsfailed == failed and not os.environ.get("HPCFL_KEEP_RUNS"):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nthe two-node runs are kept in {root}")


def sets(root, name, *extra):
    return [a for s in (f"run.root={root}", f"run.name={name}", f"cluster.python={sys.executable}", *extra)
            for a in ("--set", s)]


def submit(cluster, name, *extra, launcher="srun"):
    env, root = cluster
    r = hpcfl("submit", CONFIG, "--launcher", launcher, *sets(root, name, *extra), env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[2].rstrip(";")


def restart_controller():
    # Slurm 22.05.8 (Debian 12) can crash slurmctld after a job that ran an `srun --distribution=arbitrary`
    # step (see the script): a restart recovers the jobs from its state files
    r = subprocess.run([str(SCRIPT), "restart-controller"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def wait(cluster, job, timeout=600):
    env = {**os.environ, **cluster[0]}
    t = time.monotonic()
    while True:
        assert time.monotonic() - t < timeout, f"job {job} still queued after {timeout}s"
        q = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env)
        if q.returncode == 0 and not q.stdout.strip() or "Invalid job id" in q.stderr:
            break  # left the queue
        if q.returncode != 0:
            restart_controller()
        time.sleep(1)
    restart_controller()  # before the next submission


def finished_run(cluster, name, job):
    """The run directory of a job that left the queue; fails with the job log unless it completed."""
    wait(cluster, job)
    run = cluster[1] / name
    log = run / "slurm" / f"{job}.out"
    assert (run / "summary.json").exists(), log.read_text() if log.exists() else f"no job log {log}"
    return run


def hosts(run):
    """{rank: (host, site)} from the manifest the ranks wrote."""
    ranks = json.loads((run / "manifest.json").read_text())["ranks"]
    return {r["rank"]: (r["host"], r["site"]) for r in ranks}


def final_weights(run):
    ck = load_checkpoint(sorted((run / "checkpoints").glob("round-*.npz"))[-1])
    return ck["round"], ck["model"]


@pytest.fixture(scope="module")
def runs(cluster):
    """The srun job, submitted first, and while it runs the reference: the same federation launched on
    this machine alone (`hpcfl launch`, no SLURM)."""
    env, root = cluster
    with open(root / "one-node.out", "w") as out:
        ref = subprocess.Popen([sys.executable, "-m", "hpcfl", "launch", CONFIG, *sets(root, "one-node")], cwd=ROOT,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    try:
        yield ref, submit(cluster, "srun", launcher="srun")
    finally:
        if ref.poll() is None:  # a failed test: end the launch and its mpirun (its own process group)
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()


@pytest.fixture(scope="module")
def one_node(cluster, runs):
    ref = runs[0]
    ref.wait(timeout=600)
    assert ref.returncode == 0, (cluster[1] / "one-node.out").read_text()
    return final_weights(cluster[1] / "one-node")


def assert_same_weights(run, one_node):
    rnd, w = final_weights(run)
    ref_rnd, ref = one_node
    assert rnd == ref_rnd == 3 and w.keys() == ref.keys()
    for k in ref:
        # each site's allreduce stays inside one node in both runs, and the federation's Reduce adds the
        # same numbers in the same order on either side of a network: bit-identical, not merely close
        assert np.array_equal(w[k], ref[k]), (k, float(np.abs(w[k] - ref[k]).max()))


def site_cores(run):
    return [r["cpu_affinity"] for r in json.loads((run / "manifest.json").read_text())["ranks"][1:]]


def test_srun_job_spans_two_nodes_sites_kept_whole_same_weights_as_one_node(cluster, runs, one_node):
    run = finished_run(cluster, "srun", runs[1])
    # cluster.cores_per_socket=2: rank 0 (unpinned) and hospital-a's two ranks on the first node,
    # hospital-b on the second (the hostfile of srun's arbitrary distribution)
    assert hosts(run) == {0: (N1, None), 1: (N1, "hospital-a"), 2: (N1, "hospital-a"),
                          3: (N2, "hospital-b"), 4: (N2, "hospital-b")}
    assert site_cores(run) == [[0], [1], [0], [1]]  # each site rank pinned to its place's core
    assert_same_weights(run, one_node)


def test_mpirun_job_aggregator_on_a_node_of_its_own(cluster, runs, one_node):
    wait(cluster, runs[1])  # one job at a time: Slurm 22.05.8's slurmctld has crashed on a submission during a job
    name = "own-node"
    run = finished_run(cluster, name, submit(cluster, name, "cluster.aggregator_own_node=true",
                                             "cluster.oversubscribe=true", launcher="mpirun"))
    # cluster.aggregator_own_node: rank 0 alone on the first node, the four site ranks share the second
    # node's two cores (cluster.oversubscribe); mpirun's rankfile places and binds them
    assert hosts(run) == {0: (N1, None), 1: (N2, "hospital-a"), 2: (N2, "hospital-a"),
                          3: (N2, "hospital-b"), 4: (N2, "hospital-b")}
    assert site_cores(run) == [[0], [1], [0], [1]]
    assert_same_weights(run, one_node)
