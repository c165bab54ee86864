"""Faults around the run directory under a real mpirun: a corrupt newest checkpoint, a second launch."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, hold, hpcfl
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

SETS = ["fl.local_steps=4", "train.batch_size=16"]


def launch_argv(tmp_path, name, rounds=3):
    return ["launch", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", "--set", f"run.name={name}",
            "--set", f"fl.rounds={rounds}", *[a for s in SETS for a in ("--set", s)]]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = tmp_path / "fb"
    r = hpcfl(*launch_argv(tmp_path, "fb"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    newest = run / "checkpoints" / "round-000003.npz"
    straight = load_checkpoint(newest)["model"]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    newest.write_bytes(bytes(data))

    r = hpcfl(*launch_argv(tmp_path, "fb"), timeout=300)  # the same command again: it resumes
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [x for x in r.stderr.splitlines() if "corrupt" in x]
    assert len(warnings) == 1, r.stderr  # one line, from rank 0 only
    assert "round-000003.npz is corrupt" in warnings[0] and "resuming from round-000002.npz (round 2)" in warnings[0]
    assert "Traceback" not in r.stderr
    again = load_checkpoint(newest)
    assert again["round"] == 3
    for k, v in straight.items():  # round 3 recomputed from round 2: the same weights, bit for bit
        assert np.array_equal(again["model"][k], v), k
    assert (run / "checkpoints" / "round-000003.npz.corrupt").exists()
    rounds = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in line]
    assert len(rounds) == 3  # round 3's metrics once, not twice


def test_a_second_launch_into_a_live_run_is_refused(tmp_path):
    run = tmp_path / "busy"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gate = tmp_path / "hold"  # the first run waits at round 1 until the second launch has been refused
    first = subprocess.Popen([sys.executable, "-m", "hpcfl", *launch_argv(tmp_path, "busy", rounds=4),
                              "--set", hold(gate, 1)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "run.lock").exists(), "the first run never took its lock"
        second = hpcfl(*launch_argv(tmp_path, "busy", rounds=4), timeout=120)
        assert first.poll() is None, "the first run ended before the second launch was checked; the test proves nothing"
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"{run} is in use by pid " in lines[0] and " on host " in lines[0]
        assert f"hpcfl stop {run}" in lines[0]
        assert "mpirun" not in second.stdout  # refused before any rank started
        gate.unlink()
        out, err = first.communicate(timeout=300)
    finally:
        gate.unlink(missing_ok=True)
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out + err
    assert not (run / "run.lock").exists()  # released at the end of the run
