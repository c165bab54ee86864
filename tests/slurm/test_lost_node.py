"""A node lost in the middle of a two-node job (every process of namespace node hpcfl-n2 killed: its slurmd, its
job step, its ranks): the job ends within the hang timeout, in one line naming the node and the ranks and sites
on it (rank 0's watchdog: every rank of that node stopped beating at once); the same command run again resumes
after the last complete round and ends with the weights of an uninterrupted run."""
import json
import os
import subprocess
import time

import numpy as np
from conftest import hold, hpcfl
from test_two_nodes import (CONFIG, N2, SCRIPT, cluster, final_weights, finished_run,  # noqa: F401 - a fixture
                            restart_controller, sets, submit)

HANG_S = 30  # fault.hang_min_s: the automatic timeout once rounds are known (rounds here take ~1 s)
ROUNDS = 12
HELD = 4  # the fault strikes at the start of this round: rounds 1-3 are complete and checkpointed
EXTRA = (f"fl.rounds={ROUNDS}", f"fault.hang_min_s={HANG_S}")
AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def running(cluster, name):  # noqa: F811
    """(job, run directory, hold file, the extra ``--set``s) of a two-node federation held at the start of
    round HELD (debug.hold: at a known round, however fast or loaded the machine) while the hold file exists.
    The resumed run repeats the same ``--set``s (the hold file is gone by then: no hold)."""
    root = cluster[1]
    held = root / f"{name}.hold"
    extra = (*EXTRA, hold(held, HELD))
    job = submit(cluster, name, *extra)
    run = root / name
    t = time.monotonic()
    while phase(run, 0) != "held (debug.hold)":
        assert time.monotonic() - t < 300, f"job {job} never reached round {HELD}"
        time.sleep(0.2)
    assert (run / "metrics.jsonl").read_text().count('"kind": "round"') == HELD - 1
    return job, run, held, extra


def phase(run, rank):
    """The phase in ``rank``'s heartbeat file, None before it has one."""
    try:
        return json.loads((run / "logs" / f"rank-{rank:04d}.beat").read_text()).get("phase")
    except (OSError, ValueError):
        return None


def ending_line(run, since, limit=240):
    """The line a rank recorded when it ended the job (error.json), waited for up to ``limit`` s after ``since``:
    the 300 s floor of the automatic timeout must not be what ends it."""
    while True:
        for p in (run / "logs").glob("rank-*.error.json"):
            return json.loads(p.read_text())["line"], time.monotonic() - since
        assert time.monotonic() - since < limit, f"no line in {limit} s"
        time.sleep(1)


def resume_when_back(cluster, run, extra, done=HELD - 1):  # noqa: F811
    """The node comes back and the same command is run again (what a requeue does): the run resumes after
    its last complete round ``done`` and ends with the weights of an uninterrupted run (one node or two
    give the same sums: test_two_nodes)."""
    root = cluster[1]
    back = subprocess.run([str(SCRIPT), "restart-node", N2], capture_output=True, text=True, timeout=180)
    assert back.returncode == 0, back.stdout + back.stderr
    restart_controller()  # Slurm 22.05.8's slurmctld crashes on the submission after such a job (test_two_nodes)
    run = finished_run(cluster, run.name, submit(cluster, run.name, *extra))
    logs = "".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))
    assert f"resuming after round {done}" in logs, logs[-3000:]
    (ra, a), (rb, b) = final_weights(run), straight(root)
    assert ra == rb == ROUNDS and a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


_STRAIGHT = []  # (round, weights) of the uninterrupted run: both node-fault modules compare with the same one


def straight(root):
    """The final (round, weights) of the same federation uninterrupted: `hpcfl launch` on this machine, run
    once per session (the two node-fault tests share it)."""
    if not _STRAIGHT:
        r = hpcfl("launch", CONFIG, *sets(root, "straight", *EXTRA), env=AS_ROOT, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        _STRAIGHT.append(final_weights(root / "straight"))
    return _STRAIGHT[0]


def kill_node(name):
    """Kill every process running in network namespace ``name`` (what a node that loses power does)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=True).stdout.split()
    for pid in pids:
        subprocess.run(["kill", "-9", pid])
    return pids


def test_a_lost_node_ends_the_job_naming_the_node_its_ranks_and_sites(cluster):  # noqa: F811
    env, root = cluster
    job, run, held, extra = running(cluster, "lost")
    assert kill_node(N2)
    killed = time.monotonic()
    # rank 0 stays held: it must not send round HELD's plan to the dead ranks (an MPI error, not the watchdog)
    line, found = ending_line(run, killed)
    held.unlink()
    assert line.startswith(f"hpcfl: node {N2} is lost or unreachable: its ranks 3, 4 (site hospital-b) all stopped "
                           "beating"), line
    assert (run / "metrics.jsonl").read_text().count('"kind": "round"') == HELD - 1
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
    resume_when_back(cluster, run, extra)
