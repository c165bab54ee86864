"""Preemption at the worst moment, under a real mpirun: SLURM's warning signal (SIGUSR1 to rank 0) arriving while
rank 0's background thread writes a checkpoint, a second warning right after the first requeue, and a hard kill
of rank 0 in the middle of a checkpoint write. Each ends, after relaunches (what a requeue does), with the
uninterrupted run's weights bit for bit; a half-written checkpoint is never read."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, hold, hpcfl
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

ROUNDS = 8
# a model of ~17M parameters: each checkpoint write (zip, SHA-256, ~70 MB) lasts long enough to be caught
SETS = ["fl.local_steps=2", "train.batch_size=16", "model.hidden=[4096,4096]", f"fl.rounds={ROUNDS}",
        "launch.slots=2", "eval.cross_site=false", "observe.tensorboard=false"]


def argv(tmp_path, name, *extra):
    return [sys.executable, "-m", "hpcfl", "launch", "configs/digits.yaml", "--no-report",
            *[a for s in (f"run.root={tmp_path}", f"run.name={name}", *SETS, *extra) for a in ("--set", s)]]


def start(tmp_path, name, *extra):
    out = open(tmp_path / f"{name}.out", "a")
    return subprocess.Popen(argv(tmp_path, name, *extra), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rank0_pid(run, not_pid=None, timeout=180):
    """The pid of this launch's rank 0 (its heartbeat), once its rounds have started."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            beat = json.loads((run / "logs" / "rank-0000.beat").read_text())
        except (OSError, ValueError):
            beat = {}
        if beat.get("pid") not in (None, not_pid) and not str(beat.get("phase", "start-up")).startswith("start-up"):
            return beat["pid"]
        time.sleep(0.05)
    pytest.fail(f"rank 0 of {run} never started its rounds")


def during_a_write(run, proc, after_round=1, timeout=240):
    """Wait until rank 0's background thread is writing a checkpoint of a round after ``after_round``
    (its temporary file exists); returns that file's name."""
    ck = run / "checkpoints"
    t = time.monotonic()
    while time.monotonic() - t < timeout and proc.poll() is None:
        try:
            names = os.listdir(ck)
        except OSError:
            names = []
        tmp = [n for n in names if n.startswith(".round-") and ".npz.tmp-" in n and int(n[7:13]) > after_round]
        if tmp:
            return tmp[0]
        time.sleep(0.002)
    pytest.fail(f"no checkpoint write of {run} was caught in progress")


def weights(run):
    ck = load_checkpoint(sorted((run / "checkpoints").glob("round-*.npz"))[-1])
    return ck["round"], ck["model"]


def assert_same(run, ref):
    rnd, w = weights(run)
    assert rnd == ROUNDS and w.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(w[k], ref[k]), k
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in x]
    assert rounds == list(range(1, ROUNDS + 1))  # each round once
    assert not list((run / "checkpoints").glob(".round-*.tmp-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    r = subprocess.run(argv(tmp, "straight"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return weights(tmp / "straight")[1]


def test_a_warning_during_a_checkpoint_write_and_another_right_after_the_requeue(tmp_path, reference):
    run = tmp_path / "warned"
    first = start(tmp_path, "warned")
    pid = rank0_pid(run)
    caught = during_a_write(run, first)
    os.kill(pid, signal.SIGUSR1)  # SLURM's warning, while the checkpoint thread writes
    assert first.wait(timeout=300) == 0, (tmp_path / "warned.out").read_text()
    stopped = json.loads((run / "summary.json").read_text())["stopped_after_round"]
    assert stopped >= int(caught[7:13]), (stopped, caught)
    # the requeued job, warned again as soon as its rounds start (held at its first round until then: however
    # fast the rounds, the warning comes before the last one)
    assert stopped < ROUNDS - 1, stopped
    second = start(tmp_path, "warned", hold(tmp_path / "gate", stopped + 1))
    os.kill(rank0_pid(run, not_pid=pid), signal.SIGUSR1)
    assert second.wait(timeout=300) == 0, (tmp_path / "warned.out").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resumed_from_round"] == stopped
    again = json.loads((run / "summary.json").read_text()).get("stopped_after_round")
    assert again is not None and stopped < again < ROUNDS, again
    third = hpcfl(*argv(tmp_path, "warned")[3:], timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"resuming after round {again}" in third.stdout + third.stderr
    assert_same(run, reference)


def test_rank_0_killed_in_the_middle_of_a_checkpoint_write(tmp_path, reference):
    run = tmp_path / "killed"
    first = start(tmp_path, "killed")
    pid = rank0_pid(run)
    caught = during_a_write(run, first)
    os.kill(pid, signal.SIGKILL)  # a preemption without warning, or a node going away, mid-write
    assert first.wait(timeout=120) != 0
    assert int(caught[7:13]) >= 2
    for ck in (run / "checkpoints").glob("round-*.npz"):  # a file under a checkpoint's name is a whole one
        load_checkpoint(ck)
    r = hpcfl(*argv(tmp_path, "killed")[3:], timeout=600)  # the requeue: the same command
    assert r.returncode == 0, r.stdout + r.stderr
    assert "corrupt" not in r.stderr, r.stderr  # the half-written file was never taken for a checkpoint
    assert_same(run, reference)
