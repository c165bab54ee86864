"""A real one-node SLURM cluster on this machine: rendered jobs submitted, run, requeued, resumed."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, hold, hpcfl
from conftest import hpcfl as hpcfl_cli
from hpcfl.checkpoint import load_checkpoint

NCPU = len(os.sched_getaffinity(0))
LOCAL = ["cluster.nodes=1", "cluster.sockets_per_node=1", f"cluster.cores_per_socket={NCPU}", "cluster.cores_per_rank=1",
         "cluster.aggregator_cores=0", "cluster.oversubscribe=true", f"cluster.python={sys.executable}",
         "cluster.time_limit=00:10:00", "fl.local_steps=6", "train.batch_size=16"]
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # the test jobs run as root


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the slurm tier starts slurmctld/slurmd on this machine and needs root")
    if shutil.which("slurmctld") is None:
        pytest.fail("slurm-wlm is not installed: run `make test`, which installs it (HPCFL_WITH_SLURM=1)")
    r = subprocess.run([str(ROOT / "scripts" / "local_slurm.sh"), "start"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    subprocess.run([str(ROOT / "scripts" / "local_slurm.sh"), "stop"], capture_output=True, timeout=60)


def submit(tmp_path, name, *sets, launcher="srun"):
    args = [a for s in (*LOCAL, f"run.root={tmp_path}", f"run.name={name}", *sets) for a in ("--set", s)]
    # no OMPI_ALLOW_RUN_AS_ROOT here: hpcfl submit as root gives the job Open MPI's permission itself
    r = hpcfl("submit", "configs/digits-2x2.yaml", "--launcher", launcher, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[2].rstrip(";")


# States a job does not leave (squeue does not list a job while it is REQUEUED, so it is asked of scontrol)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}


def in_queue(job):
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    if r.returncode != 0:  # purged from the controller (MinJobAge) is gone; anything else: ask again
        return "Invalid job id" not in r.stderr
    state = r.stdout.split("JobState=")[1].split()[0]
    return state not in ENDED


def wait(job, timeout=300):
    t = time.monotonic()
    while in_queue(job):
        assert time.monotonic() - t < timeout, f"job {job} still queued after {timeout}s"
        time.sleep(1)


def wait_for_resume(job, log, timeout=300):
    """Until the requeued job's second run has resumed (its log says so). A requeued job waits SLURM's
    requeue delay (cred_expire: 20 s on the local cluster); forcing it to start sooner made slurmd kill
    it ("Job credential revoked") now and then, and the test read the first run's files."""
    t = time.monotonic()
    while not (log.exists() and "resuming after round" in log.read_text()):
        assert time.monotonic() - t < timeout, f"job {job} did not resume in {timeout}s: " + (
            log.read_text() if log.exists() else "no job log")
        time.sleep(1)


def wait_for_round(metrics, job, n):
    t = time.monotonic()
    while not (metrics.exists() and metrics.read_text().count('"kind": "round"') >= n):
        assert time.monotonic() - t < 240 and in_queue(job), f"job {job} never reached round {n}"
        time.sleep(0.2)


def wait_for_requeue(job):
    t = time.monotonic()
    while "Restarts=1" not in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout:
        assert time.monotonic() - t < 120, f"job {job} was not requeued"
        time.sleep(0.5)


def final(run):
    ck = sorted((run / "checkpoints").glob("round-*.npz"))[-1]
    return load_checkpoint(ck)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_rendered_job_runs_the_federation(cluster, tmp_path, launcher):
    job = submit(tmp_path, f"via-{launcher}", "fl.rounds=2", launcher=launcher)
    wait(job)
    run = tmp_path / f"via-{launcher}"
    log = (run / "slurm" / f"{job}.out").read_text()
    assert (run / "summary.json").exists(), log
    assert json.loads((run / "summary.json").read_text())["final"]["round"] == 2
    ranks = json.loads((run / "manifest.json").read_text())["ranks"]
    assert len(ranks) == 5 and {r["role"] for r in ranks} == {"aggregator", "site"}
    assert all(len(r["cpu_affinity"]) == 1 for r in ranks[1:])  # pinned (by the rankfile or by themselves)
    st = hpcfl("status", run)
    assert st.returncode == 0 and f"job {job}: COMPLETED" in st.stdout and "2/2 rounds done" in st.stdout


def test_requeued_job_resumes_and_ends_with_the_uninterrupted_weights(cluster, tmp_path):
    rounds = 16
    straight = submit(tmp_path, "straight", f"fl.rounds={rounds}")
    wait(straight)
    gate = tmp_path / "hold-preempted"  # held at round 4 until requeued: it cannot finish first on a fast machine
    job = submit(tmp_path, "preempted", f"fl.rounds={rounds}", hold(gate, 4))
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    wait_for_round(metrics, job, 3)
    subprocess.run(["scontrol", "requeue", job], check=True)  # what preemption does
    gate.unlink()
    wait_for_resume(job, tmp_path / "preempted" / "slurm" / f"{job}.out")
    wait(job)
    log = (tmp_path / "preempted" / "slurm" / f"{job}.out").read_text()
    assert "resuming after round" in log, log
    resumed_at = int(log.split("resuming after round")[1].split()[0].rstrip(")"))
    assert 3 <= resumed_at < rounds
    a, b = final(tmp_path / "straight"), final(tmp_path / "preempted")
    assert a["round"] == b["round"] == rounds
    for k in a["model"]:
        assert np.array_equal(a["model"][k], b["model"][k]), k

    # graceful: SLURM's warning signal (#SBATCH --signal=B:USR1@N, sent here now) -> the round in progress
    # finishes, rank 0 checkpoints it, every rank exits, and the job requeues itself
    gate = tmp_path / "hold-warned"  # held at round 4 until the warning's stop file ends the hold
    job = submit(tmp_path, "warned", f"fl.rounds={rounds}", hold(gate, 4))
    metrics = tmp_path / "warned" / "metrics.jsonl"
    wait_for_round(metrics, job, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_requeue(job)
    gate.unlink()
    wait_for_resume(job, tmp_path / "warned" / "slurm" / f"{job}.out")
    wait(job)
    log0 = (tmp_path / "warned" / "logs" / "rank-0000.log").read_text()
    assert "stop requested (a stop file)" in log0, log0
    stopped = json.loads((tmp_path / "warned" / "manifest.json").read_text())["resumed_from_round"]
    assert 3 <= stopped < rounds
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["round"] for x in recs if x["kind"] == "round"] == list(range(1, rounds + 1))
    c = final(tmp_path / "warned")
    for k in a["model"]:
        assert np.array_equal(a["model"][k], c["model"][k]), k


def test_submitit_slurm_executor_runs_one_task_per_rank(cluster, tmp_path, monkeypatch):
    import hpcfl

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    sets = [f"run.root={tmp_path}", "fl.rounds=2", "fl.local_steps=6", "train.batch_size=16", "cluster.nodes=1"]
    job = hpcfl.submit("configs/digits-2x2.yaml", sets, executor="slurm")
    results = job.results()
    assert len(results) == 5  # one submitit task per rank
    assert results[0]["final"]["round"] == 2 and results[0]["final"]["val_accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert all(r is None or r["final"]["round"] == 2 for r in results)


def test_submitit_preemption_finishes_the_round_requeues_and_resumes(cluster, tmp_path, monkeypatch):
    import hpcfl

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    rounds = 14
    sets = [f"run.root={tmp_path}", f"fl.rounds={rounds}", "fl.local_steps=6", "train.batch_size=16", "cluster.nodes=1"]
    ref = hpcfl_cli("launch", "configs/digits-2x2.yaml", *[a for s in sets + ["run.name=ref"] for a in ("--set", s)],
                    env=ENV, timeout=300)
    assert ref.returncode == 0, ref.stderr
    gate = tmp_path / "hold"  # held at round 4 until the preemption's stop ends the hold
    job = hpcfl.submit("configs/digits-2x2.yaml", [*sets, hold(gate, 4)], executor="slurm")
    run = tmp_path / "digits-2x2"
    metrics = run / "metrics.jsonl"
    wait_for_round(metrics, job.job_id, 3)
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then submitit's USR2
    wait_for_requeue(job.job_id)
    gate.unlink()
    wait(job.job_id)
    results = job.results()
    assert results[0]["final"]["round"] == rounds
    assert "stop requested" in (run / "logs" / "rank-0000.log").read_text()
    resumed = json.loads((run / "manifest.json").read_text())["resumed_from_round"]
    assert 3 <= resumed < rounds
    a, b = final(tmp_path / "ref"), final(run)
    for k in a["model"]:
        assert np.array_equal(a["model"][k], b["model"][k]), k
