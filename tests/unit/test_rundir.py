import json
import os
import time

import numpy as np
import pytest
import yaml

from hpcfl.checkpoint import save_checkpoint
from hpcfl.config import config_hash, from_dict, to_dict
from hpcfl.errors import CheckpointError
from hpcfl.rundir import LOCK_STALE_S, RunDir, RunDirBusy, lock_verdict

BASE = {"sites": [{"name": "a"}, {"name": "b"}], "fl": {"rounds": 3}}


def run_with_checkpoint(tmp_path, raw_config):
    cfg = from_dict({**raw_config, "run": {"root": str(tmp_path), "name": "r"}})
    rd = RunDir(cfg)
    rd.prepare()
    save_checkpoint(rd.checkpoints, 2, {"w": np.zeros(2, np.float32)}, {"config_hash": config_hash(cfg), "records": []})
    return rd, cfg


def test_resume_allows_more_rounds_and_refuses_changed_training(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    more = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "r"}}, overrides=["fl.rounds=9"])
    assert RunDir(more).check()["round"] == 2
    lr = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "r"}}, overrides=["train.lr=0.7"])
    with pytest.raises(CheckpointError, match=r"different config \(train.lr: 0.05 -> 0.7\).*--restart"):
        RunDir(lr).check()
    assert RunDir(lr).check(restart=True) is None


def test_a_config_key_added_since_the_run_does_not_block_resume(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    old = to_dict(cfg)
    del old["model"]["conv_blocks"]  # as written by an hpcfl that did not know this key yet
    (rd.path / "config.yaml").write_text(yaml.safe_dump(old))
    assert RunDir(cfg).check()["round"] == 2


def test_restart_moves_the_old_run_aside(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    (rd.path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    assert RunDir(cfg).prepare(restart=True) is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists()  # nothing lost


def test_resume_without_checkpoint_is_an_error(tmp_path):
    cfg = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "fresh"}})
    with pytest.raises(CheckpointError, match="--resume given but there is no checkpoint"):
        RunDir(cfg).check(resume=True)


# -- a corrupt newest checkpoint: fall back to the previous complete one ---------------------------


def three_rounds(tmp_path):
    """A run directory with checkpoints of rounds 1-3 (keep 3) and metrics for rounds 1-3."""
    cfg = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "r"}, "checkpoint": {"keep": 3}})
    rd = RunDir(cfg)
    rd.prepare()
    for r in (1, 2, 3):
        save_checkpoint(rd.checkpoints, r, {"w": np.full(4, r, np.float32)},
                        {"config_hash": config_hash(cfg), "records": [{"round": r, "kind": "round"}]}, keep=3)
    (rd.path / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "kind": "round"}) + "\n" for r in (1, 2, 3)))
    rd.close()
    return cfg, rd


def flip(p, where):
    data = bytearray(p.read_bytes())
    data[where(len(data))] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip-middle", "flip-weights", "truncate"])
def test_a_corrupt_newest_checkpoint_is_reported_once_and_the_previous_one_used(tmp_path, capsys, damage):
    cfg, rd = three_rounds(tmp_path)
    newest = rd.checkpoints / "round-000003.npz"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        at = newest.read_bytes().find(np.full(4, 3, np.float32).tobytes()) + 2  # in the weights
        flip(newest, (lambda n: n // 2) if damage == "flip-middle" else (lambda n: at))
    assert RunDir(cfg).check()["round"] == 2  # what `hpcfl launch` sees before starting ranks
    capsys.readouterr()
    again = RunDir(cfg)
    ckpt = again.prepare()
    err = capsys.readouterr().err
    assert ckpt["round"] == 2 and float(ckpt["model"]["w"][0]) == 2.0
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("hpcfl: warning: ") and "round-000003.npz is corrupt" in err
    assert "resuming from round-000002.npz (round 2)" in err
    assert [p.name for p in sorted(rd.checkpoints.iterdir())] == \
        ["round-000001.npz", "round-000002.npz", "round-000003.npz.corrupt"]  # kept, out of the way
    rounds = [json.loads(x)["round"] for x in (rd.path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]  # metrics trimmed to the round resumed from
    again.close()
    capsys.readouterr()
    assert RunDir(cfg).prepare()["round"] == 2 and capsys.readouterr().err == ""  # reported once, not every launch


def test_no_valid_checkpoint_is_one_line_error(tmp_path):
    cfg, rd = three_rounds(tmp_path)
    for p in rd.checkpoints.iterdir():
        flip(p, lambda n: n // 3)
    with pytest.raises(CheckpointError) as e:
        RunDir(cfg).check()
    msg = str(e.value)
    assert "\n" not in msg and "no valid checkpoint" in msg and "--restart" in msg
    assert "round-000003.npz, round-000002.npz, round-000001.npz" in msg


def test_a_damaged_config_yaml_leaves_the_decision_to_the_checkpoint(tmp_path, capsys):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    (rd.path / "config.yaml").write_bytes(b"\x00\xff: [")
    assert RunDir(cfg).check()["round"] == 2
    assert "config.yaml is unreadable" in capsys.readouterr().err


def test_damaged_metrics_lines_are_dropped(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    (rd.path / "metrics.jsonl").write_bytes(b'{"round": 1}\n\xff\xfe\x00garbage\n[1, 2]\n{"round": "x"}\n{"round": 3}\n')
    rd.close()
    RunDir(cfg).prepare()
    assert (rd.path / "metrics.jsonl").read_text() == '{"round": 1}\n'


# -- the run directory's lock ---------------------------------------------------------------------


def write_lock(rd, **fields):
    import socket

    from hpcfl.rundir import proc_start

    rec = {"host": socket.gethostname(), "pid": os.getppid(), "proc_start": proc_start(os.getppid()),
           "started_at": "2026-12-01 10:00:00", **fields}
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.lock_path.write_text(json.dumps(rec))


def fresh(tmp_path, name="r"):
    return RunDir(from_dict({**BASE, "run": {"root": str(tmp_path), "name": name}}))


def test_a_live_run_holds_its_directory(tmp_path):
    import socket

    rd = fresh(tmp_path)
    write_lock(rd)  # the test's parent process: alive, and not us
    for attempt in (lambda: rd.check(), lambda: rd.prepare(), lambda: rd.prepare(restart=True)):
        with pytest.raises(RunDirBusy) as e:
            attempt()
        msg = str(e.value)
        assert msg == (f"{rd.path} is in use by pid {os.getppid()} on host {socket.gethostname()} (started "
                       f"2026-12-01 10:00:00); wait for it or stop it with hpcfl stop {rd.path}")
    assert sorted(p.name for p in rd.path.iterdir()) == ["run.lock"]  # nothing created, nothing moved aside


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    rd = fresh(tmp_path)
    write_lock(rd, pid=p.pid, proc_start="1")
    assert rd.check() is None  # a launch goes ahead
    rd.prepare()
    err = capsys.readouterr().err
    assert err.strip() == f"hpcfl: warning: taking over the lock of {rd.path}: pid {p.pid} on host " \
                          f"{json.loads(rd.lock_path.read_text())['host']} is gone"
    assert json.loads(rd.lock_path.read_text())["pid"] == os.getpid()
    rd.close()
    assert not rd.lock_path.exists()  # released at the end of the run


def test_a_lock_of_another_host_is_stale_when_its_heartbeat_stopped(tmp_path, capsys):
    rd = fresh(tmp_path)
    write_lock(rd, host="other-node", pid=12345)
    with pytest.raises(RunDirBusy, match="in use by pid 12345 on host other-node"):
        rd.prepare()
    old = time.time() - LOCK_STALE_S - 60
    os.utime(rd.lock_path, (old, old))
    rd.prepare()
    assert "its heartbeat from host other-node stopped" in capsys.readouterr().err
    rd.close()


def test_lock_verdicts():
    me = {"host": "a", "pid": 10, "slurm_job_id": None, "slurm_restart_count": "0"}
    alive = lambda pid: pid in (10, 11)  # noqa: E731
    start = lambda pid: "100"  # noqa: E731
    v = lambda lock, age=0.0, who=me: lock_verdict(lock, age, who, alive, start)[0]  # noqa: E731
    assert v({"host": "a", "pid": 11, "proc_start": "100"}) == "live"
    assert v({"host": "a", "pid": 12, "proc_start": "100"}) == "stale"  # dead pid
    assert v({"host": "a", "pid": 11, "proc_start": "99"}) == "stale"  # pid reused by another process
    assert v({"host": "a", "pid": 10, "proc_start": "100"}) == "mine"
    assert v({"host": "b", "pid": 11}, age=LOCK_STALE_S - 1) == "live"
    assert v({"host": "b", "pid": 11}, age=LOCK_STALE_S + 1) == "stale"
    assert v({"garbage": 1}) == "stale"
    requeued = {**me, "host": "c", "slurm_job_id": "77", "slurm_restart_count": "1"}
    assert v({"host": "b", "pid": 11, "slurm_job_id": "77", "slurm_restart_count": "0"}, who=requeued) == "stale"
    assert v({"host": "b", "pid": 11, "slurm_job_id": "77", "slurm_restart_count": "1"}, who=requeued) == "live"


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    import hpcfl.rundir.lock as R

    monkeypatch.setattr(R, "LOCK_HEARTBEAT_S", 0.05)
    rd = fresh(tmp_path)
    rd.prepare()
    old = time.time() - 1000
    os.utime(rd.lock_path, (old, old))
    deadline = time.time() + 30
    while rd.lock_path.stat().st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert rd.lock_path.stat().st_mtime > old + 500
    rd.close()


def test_the_lock_is_a_context_manager_that_releases_on_error(tmp_path):
    from hpcfl.rundir import RunLock

    with RunLock(tmp_path) as lock:
        assert lock.lock_state()[0] == "mine"
        assert json.loads(lock.lock_path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run.lock").exists()
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            raise RuntimeError("a failure while holding the lock")
    assert not (tmp_path / "run.lock").exists()


def test_a_relaunch_forgets_the_previous_launchs_heartbeats_and_stack_dump_request(tmp_path):
    # a lost node's ranks leave their last beat behind, rank 0's watchdog its dump-stacks request: the
    # relaunch's watchdog must judge its own ranks, and no rank may dump its stack at its first beat
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    rd.close()
    for name in ("rank-0003.beat", "rank-0004.beat", "dump-stacks", "rank-0003.error.json", "rank-0003.log"):
        (rd.logs / name).write_text("{}")
    assert RunDir(cfg).prepare()["round"] == 2
    assert sorted(p.name for p in rd.logs.iterdir()) == ["rank-0003.log"]
