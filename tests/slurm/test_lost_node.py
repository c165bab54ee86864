"""A node lost in the middle of a two-node job (every process of namespace node hpcfl-n2 killed: its slurmd, its
job step, its ranks): the job ends within the hang timeout, in one line naming the node and the ranks and sites
on it (rank 0's watchdog: every rank of that node stopped beating at once)."""
import json
import os
import subprocess
import time

from conftest import hpcfl
from test_two_nodes import N2, cluster, submit  # noqa: F401 - cluster is a fixture

HANG_S = 30  # fault.hang_min_s: the automatic timeout once rounds are known (rounds here take ~1 s)


def kill_node(name):
    """Kill every process running in network namespace ``name`` (what a node that loses power does)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=True).stdout.split()
    for pid in pids:
        subprocess.run(["kill", "-9", pid])
    return pids


def test_a_lost_node_ends_the_job_naming_the_node_its_ranks_and_sites(cluster):  # noqa: F811
    env, root = cluster
    job = submit(cluster, "lost", "fl.rounds=400", f"fault.hang_min_s={HANG_S}")
    run = root / "lost"
    metrics = run / "metrics.jsonl"
    t = time.monotonic()
    while not (metrics.exists() and metrics.read_text().count('"kind": "round"') >= 3):
        assert time.monotonic() - t < 300, f"job {job} never reached round 3"
        time.sleep(0.5)
    assert kill_node(N2)
    killed = time.monotonic()
    errors = run / "logs"
    line = None
    while line is None:  # the watchdog's record of what ended the job
        for p in errors.glob("rank-*.error.json"):
            line = json.loads(p.read_text())["line"]
        assert time.monotonic() - killed < 240, "no line in 240 s"  # the 300 s floor is not waited for
        time.sleep(1)
    assert line.startswith(f"hpcfl: node {N2} is lost or unreachable: its ranks 3, 4 (site hospital-b) all stopped "
                           "beating"), line
    found = time.monotonic() - killed
    assert metrics.read_text().count('"kind": "round"') < 400
    # the federation has ended: no rank is left on the surviving node (rank 0's MPI_Abort). SLURM's record
    # of the job stays COMPLETING until the controller declares the dead node DOWN (SlurmdTimeout, 300 s)
    ranks = json.loads((run / "manifest.json").read_text())["ranks"]
    alive = [r["pid"] for r in ranks if r["host"] != N2]
    while any(os.path.exists(f"/proc/{pid}") for pid in alive):
        assert time.monotonic() - killed < found + 60, f"ranks {alive} still alive after the line"
        time.sleep(0.5)
    st = hpcfl("status", run, env=env)
    assert f"node {N2} is lost or unreachable" in st.stdout, st.stdout + st.stderr
    print(f"lost node named after {found:.0f}s; every rank gone after {time.monotonic() - killed:.0f}s")
