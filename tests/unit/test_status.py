"""``hpcfl status`` / ``stop`` / ``cancel``: local runs (heartbeats, pids, ETA) and SLURM jobs on fake
``squeue``/``sacct``/``scontrol`` printing recorded outputs (the way submitit tests its job life cycle)."""
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest

from conftest import hpcfl
from hpcfl.cli import main
from hpcfl.config import dump_yaml, from_dict
from hpcfl.observe import status as S
from hpcfl.observe.status import RankStatus, rank_states, run_status

HOST = socket.gethostname()
FAKE = """#!/bin/sh
name=$(/usr/bin/basename "$0")
echo "$name $*" >> "$FAKE_SLURM/calls.log"
[ -f "$FAKE_SLURM/$name.out" ] && /bin/cat "$FAKE_SLURM/$name.out"
[ -f "$FAKE_SLURM/$name.err" ] && /bin/cat "$FAKE_SLURM/$name.err" >&2
exit $(/bin/cat "$FAKE_SLURM/$name.rc" 2>/dev/null || echo 0)
"""
UNKNOWN = "slurm_load_jobs error: Invalid job id specified\n"
NO_ACCOUNTING = "sacct: error: Slurm accounting storage is disabled\n"


def scontrol_job(job, state, reason, exit_code, run_dir, restarts=0):
    """``scontrol show job`` as SLURM 22.05 prints it (recorded on the local cluster, paths replaced)."""
    return (f"JobId={job} JobName=hpcfl-digits-2x2\n"
            f"   UserId=root(0) GroupId=root(0) MCS_label=N/A\n"
            f"   Priority=4294901757 Nice=0 Account=(null) QOS=(null)\n"
            f"   JobState={state} Reason={reason} Dependency=(null)\n"
            f"   Requeue=1 Restarts={restarts} BatchFlag=1 Reboot=0 ExitCode={exit_code}\n"
            f"   RunTime=00:00:12 TimeLimit=00:10:00 TimeMin=N/A\n"
            f"   Partition=debug AllocNode:Sid={HOST}:1234\n"
            f"   NodeList={HOST}\n"
            f"   NumNodes=1 NumCPUs=5 NumTasks=5 CPUs/Task=1 ReqB:S:C:T=0:0:*:*\n"
            f"   Command={run_dir}/slurm/job-20261130-043000.sbatch\n"
            f"   WorkDir=/work/main\n"
            f"   Comment=hpcfl:{run_dir} \n"
            f"   StdErr={run_dir}/slurm/{job}.out\n"
            f"   StdIn=/dev/null\n"
            f"   StdOut={run_dir}/slurm/{job}.out\n"
            f"   Power=\n")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A PATH holding only fake squeue/sacct/scontrol/scancel; ``set(name, out, rc, err)`` records an answer."""
    d = tmp_path / "fakebin"
    d.mkdir()
    for name in ("squeue", "sacct", "scontrol", "scancel"):
        (d / name).write_text(FAKE)
        (d / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(d))
    monkeypatch.setenv("FAKE_SLURM", str(d))

    class Fake:
        dir = d

        def set(self, name, out="", rc=0, err=""):
            (d / f"{name}.out").write_text(out)
            (d / f"{name}.rc").write_text(str(rc))
            (d / f"{name}.err").write_text(err)

        def remove(self, name):
            (d / name).unlink()

        def calls(self):
            p = d / "calls.log"
            return p.read_text().splitlines() if p.exists() else []

    return Fake()


def make_run(root, name="run", rounds_done=2, rounds=5, finished=False, beats=None, pids=None, error=None):
    """A run directory as a 5-rank digits run leaves it: config.yaml, manifest.json, metrics.jsonl, logs/."""
    from test_observe import records

    run = root / name
    (run / "logs").mkdir(parents=True)
    cfg = from_dict({"sites": [{"name": "hospital-a", "ranks": 2}, {"name": "hospital-b", "ranks": 2}],
                     "run": {"name": name, "root": str(root)}, "fl": {"rounds": rounds}})
    (run / "config.yaml").write_text(dump_yaml(cfg))
    sites = [None, "hospital-a", "hospital-a", "hospital-b", "hospital-b"]
    ranks = [{"rank": r, "role": "aggregator" if r == 0 else "site", "site": sites[r], "host": HOST,
              "pid": (pids or {}).get(r, 999999999)} for r in range(5)]
    (run / "manifest.json").write_text(json.dumps({"run": name, "ranks": ranks}))
    recs = [r for r in records(rounds_done)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if finished:
        time.sleep(0.01)
        (run / "summary.json").write_text(json.dumps({"final": recs[-1], "rounds": rounds}))
    for r, beat in (beats or {}).items():
        (run / "logs" / f"rank-{r:04d}.beat").write_text(json.dumps({"rank": r, "host": HOST, **beat}))
    if error:
        (run / "logs" / "rank-0003.error.json").write_text(json.dumps({"rank": 3, "time": 1.0, "line": error}))
    return run


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- liveness ------------------------------------------------------------------------------------------------------
def test_rank_states_from_heartbeats_and_pids():
    manifest = {"ranks": [{"rank": 0, "host": "me", "pid": 10}, {"rank": 1, "host": "me", "pid": 11, "site": "a"},
                          {"rank": 2, "host": "other", "pid": 12, "site": "a"}, {"rank": 3, "host": "me", "pid": 13},
                          {"rank": 4, "host": "other", "pid": 14}]}
    beats = {0: {"time": 95.0, "phase": "aggregate", "round": 3},  # 5 s old: alive
             1: {"time": 80.0, "phase": "train", "round": 3},  # 20 s old, process still there: stuck
             2: {"time": 99.0, "phase": "train", "round": 3, "progress": 7, "progress_time": 20.0, "site": None},
             3: {"time": 50.0, "phase": "done", "round": 3}}  # it exited cleanly
    st = rank_states(manifest, beats, now=100.0, host="me", alive=lambda pid: pid in (10, 11))
    assert [(r.rank, r.state) for r in st] == [(0, "alive"), (1, "stuck"), (2, "alive"), (3, "done"), (4, "unknown")]
    assert st[1].beat_age_s == 20.0 and "stuck" in st[1].describe() and "phase train" in st[1].describe()
    assert st[2].site == "a" and st[2].progress == 80.0  # a beat without a site keeps the manifest's
    assert "alive, phase train, round 3, no progress for 80s" in st[2].describe()
    assert "not alive" in RankStatus(3, "me", 13, state="gone").describe()
    # a rank that serves several sites in turn (a slot): listed under each, its phase under the one it works for
    slot = {"ranks": [{"rank": 1, "host": "me", "pid": 11, "site": None, "sites": ["a", "b"]}]}
    st = rank_states(slot, {1: {"time": 99.0, "phase": "train", "round": 2, "site": "b"}}, 100.0, "me")
    assert st[0].sites == ["a", "b"] and st[0].site == "b" and st[0].describe() == "rank 1 (b): alive, phase train, round 2"


def test_pid_alive_checks_this_process_and_a_dead_pid():
    assert not S.pid_alive(2 ** 22 + 12345)
    assert S.pid_alive(os.getpid()) == (b"hpcfl" in Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
                                        or b"mpi4py" in Path(f"/proc/{os.getpid()}/cmdline").read_bytes())


def test_running_run_shows_the_round_in_progress_eta_sites_and_ranks(tmp_path):
    now = time.time()
    beats = {r: {"time": now - 1, "pid": 999999999, "phase": "train", "round": 3} for r in range(5)}
    beats[4] = {"time": now - 30, "pid": 999999999, "phase": "evaluate", "round": 3}
    run = make_run(tmp_path, rounds_done=2, rounds=5, beats=beats)
    st = run_status(run, now=now)
    assert st.state == "running" and st.round_in_progress == 3 and st.last_round == 2
    # rounds after the first: round 2 took 0.5 * 2 = 1.0 s; 3 rounds left; round 2 ended at 1e9 + 2 (long ago)
    assert st.mean_round_s == pytest.approx(1.0) and st.eta_s == 0.0
    st = run_status(run, now=1e9 + 2.5)
    assert st.eta_s == pytest.approx(3 * 1.0 - 0.5)
    assert st.round_in_progress == 3
    text = "\n".join(S.format_status(st))
    assert "running, round 3/5 in progress, ETA" in text
    lines = S.format_status(run_status(run, now=now))
    text = "\n".join(lines)
    assert "ranks: 4/5 alive" in text and "rank 4 (hospital-b): not alive" in text and "phase evaluate" in text
    site_a = next(line for line in lines if line.strip().startswith("hospital-a"))
    assert "0.2000" in site_a and "2/2 alive (train)" in site_a  # round 2: accuracy 0.1 * 2 + 0.01 * 0
    assert not any(c in text for c in "\r\x1b")
    # rank 0's beat is up to 2 s old: it may still name an earlier round than the metrics show finished
    (run / "logs" / "rank-0000.beat").write_text(json.dumps({"rank": 0, "time": now, "round": 1}))
    assert run_status(run, now=now).round_in_progress == 3


def test_finished_failed_and_interrupted_runs(tmp_path):
    st = run_status(make_run(tmp_path, "fin", rounds_done=5, rounds=5, finished=True))
    assert st.state == "finished" and st.round_in_progress is None and st.eta_s is None
    assert "fin: finished, 5/5 rounds done" in S.format_status(st)[0]
    st = run_status(make_run(tmp_path, "bad", error="hpcfl: rank 3 (site 'hospital-b') failed: boom"))
    assert st.state == "failed" and "  hpcfl: rank 3 (site 'hospital-b') failed: boom" in S.format_status(st)
    st = run_status(make_run(tmp_path, "cut"))  # no heartbeats, pids gone
    assert st.state == "interrupted" and st.last_round == 2
    st = run_status(make_run(tmp_path, "me", pids={r: os.getpid() for r in range(5)}))
    assert st.state == ("running" if S.pid_alive(os.getpid()) else "interrupted")


# -- the CLI on local run directories ---------------------------------------------------------------------------
def test_status_of_a_local_run_has_no_job_line(tmp_path, capsys):
    run = make_run(tmp_path, rounds_done=5, rounds=5, finished=True)
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 0 and not err
    assert "job" not in out.splitlines()[0] and "finished" in out.splitlines()[0]
    rc, out, _ = run_cli(capsys, "status", run, "--json")
    doc = json.loads(out)
    assert doc["job"] is None and doc["run"]["state"] == "finished" and doc["run"]["last_round"] == 5


@pytest.mark.parametrize("name,content,named", [
    ("config.yaml", "fl: [1, 2\n", "config.yaml: corrupt (not YAML at line 2)"),
    ("manifest.json", "[1, 2", "manifest.json: corrupt (not JSON"),
    ("manifest.json", "[1, 2]", "manifest.json: corrupt (a JSON dict expected, found list)"),
    ("metrics.jsonl", '{"kind": "round", "round": 1}\n{"kind": "ro\n{"kind": "round", "round": 2}\n',
     "metrics.jsonl: corrupt line 2 (not JSON)"),
    ("metrics.jsonl", b"\xff\xfe\x00garbage", "metrics.jsonl: cannot read"),
    ("slurm/jobs.json", "{not json", "jobs.json: corrupt (not JSON"),
    ("slurm/jobs.json", '[{"id": 3}]', "jobs.json: corrupt (a list of"),
])
def test_corrupt_run_directory_files_are_named_in_one_line(tmp_path, capsys, name, content, named):
    run = make_run(tmp_path)
    p = run / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, out, err = run_cli(capsys, "status", run)
    assert rc != 0 and named in err and str(p) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_metrics_line_being_written_is_not_corruption(tmp_path, capsys):
    run = make_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "site", "round": 3, "si')  # rank 0 is in the middle of appending
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 0 and "2/5 rounds done" in out, err


@pytest.mark.parametrize("command", ["status", "stop", "cancel"])
def test_nothing_to_report_exits_non_zero(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    for target, said in ((tmp_path / "empty", "empty"), (tmp_path / "nope", "no such run directory"),
                         ("not-a-job", "not a SLURM job id")):
        rc, out, err = run_cli(capsys, command, target)
        assert rc != 0 and said in err and len(err.strip().splitlines()) == 1, (command, target, err)
    assert list((tmp_path / "empty").iterdir()) == []  # nothing written


def test_stop_asks_a_running_run_and_refuses_a_finished_one(tmp_path, capsys):
    now = time.time()
    run = make_run(tmp_path, "live", beats={r: {"time": now + 60, "pid": 999999999} for r in range(5)})
    rc, out, err = run_cli(capsys, "stop", run)
    assert rc == 0 and (run / "stop-requested").exists(), err
    run = make_run(tmp_path, "done", rounds_done=5, rounds=5, finished=True)
    rc, out, err = run_cli(capsys, "stop", run)
    assert rc != 0 and "already finished" in err and not (run / "stop-requested").exists()
    run = make_run(tmp_path, "cut")
    rc, out, err = run_cli(capsys, "stop", run)
    assert rc != 0 and "not running (interrupted after round 2)" in err and not (run / "stop-requested").exists()


def test_watch_prints_plain_blocks_until_the_run_ends(monkeypatch):
    states = iter([(["a: running"], {}, True), (["a: running"], {}, True), (["a: finished"], {}, False)])
    monkeypatch.setattr(S, "collect", lambda run_dir, job_id: next(states))
    slept, out = [], io.StringIO()
    assert S.watch(Path("a"), None, 5.0, out=out, sleep=slept.append) == 0
    lines = out.getvalue().splitlines()
    assert slept == [5.0, 5.0] and lines[1::2] == ["a: running", "a: running", "a: finished"]
    assert all(line.startswith("--- ") for line in lines[::2]) and "\x1b" not in out.getvalue()


def test_watch_cli_on_a_finished_run_prints_once_and_exits(tmp_path):
    run = make_run(tmp_path, rounds_done=5, rounds=5, finished=True)
    r = hpcfl("status", run, "--watch", "0.1", timeout=120)
    assert r.returncode == 0 and r.stdout.count("--- ") == 1 and "finished" in r.stdout, r.stderr
    assert "\x1b" not in r.stdout
    r = hpcfl("status", run, "--watch", "0", timeout=120)
    assert r.returncode != 0 and "--watch: 0.0 is not a positive number" in r.stderr


# -- SLURM, on fake clients ------------------------------------------------------------------------------------------
def test_no_slurm_client_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, out, err = run_cli(capsys, "status", "8")
    assert rc != 0 and err.strip().startswith("hpcfl: no SLURM client here: squeue not found")
    run = make_run(tmp_path)
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": "8"}]))
    rc, out, err = run_cli(capsys, "status", run)  # the run directory is still reported
    assert rc == 0 and out.startswith("job 8: no SLURM client here: squeue not found") and "2/5 rounds done" in out
    rc, out, err = run_cli(capsys, "cancel", run)
    assert rc != 0 and "no SLURM client here: scancel not found" in err


def test_a_running_job_by_id_finds_its_run_directory(tmp_path, capsys, fake_slurm):
    run = make_run(tmp_path)
    fake_slurm.set("squeue", "RUNNING|None\n")
    fake_slurm.set("scontrol", scontrol_job(8, "RUNNING", "None", "0:0", run))
    rc, out, err = run_cli(capsys, "status", "8")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "job 8: RUNNING" and lines[1].startswith(f"{run}: ")
    assert "squeue -h -j 8 -o %T|%r" in fake_slurm.calls()


@pytest.mark.parametrize("sacct,scontrol,log,expect", [
    # accounting: sacct knows the end state
    ("8|COMPLETED|0:0|None\n", None, "round 2/2 ...\n", "job 8: COMPLETED"),
    ("8|CANCELLED by 0|0:0|None\n", None, "slurmstepd: error: *** JOB 8 ON vm CANCELLED AT 2026-11-30T04:31:02 ***\n",
     "job 8: CANCELLED: slurmstepd: error: *** JOB 8 ON vm CANCELLED AT 2026-11-30T04:31:02 ***"),
    ("8|TIMEOUT|0:0|TimeLimit\n", None,
     "round 3/9\nslurmstepd: error: *** JOB 8 ON vm CANCELLED AT 2026-11-30T05:31:02 DUE TO TIME LIMIT ***\n",
     "job 8: TIMEOUT (TimeLimit): slurmstepd: error: *** JOB 8 ON vm CANCELLED AT 2026-11-30T05:31:02 DUE TO TIME LIMIT ***"),
    ("8|PREEMPTED|0:15|None\n", None, "", "job 8: PREEMPTED (signal 15)"),
    ("8|OUT_OF_MEMORY|0:125|OutOfMemory\n", None,
     "slurmstepd: error: Detected 1 oom_kill event in StepId=8.0. Some of the step tasks have been OOM Killed.\n",
     "job 8: OUT_OF_MEMORY (signal 125, OutOfMemory): slurmstepd: error: Detected 1 oom_kill event"),
    # a requeued job: sacct lists its runs, the last one counts
    ("8|REQUEUED|0:0|None\n8|FAILED|2:0|NonZeroExitCode\n", None, "", "job 8: FAILED (exit code 2, NonZeroExitCode)"),
    # accounting disabled: scontrol still knows the job, its state and exit code
    (None, ("FAILED", "NonZeroExitCode", "1:0"),
     "hpcfl: quickstart: 5 ranks\nTraceback (most recent call last):\nOSError: [Errno 22] Invalid argument\n"
     "hpcfl: rank 2 (site 'hospital-a', rank 1 of 2 in site) failed: OSError: [Errno 22] Invalid argument "
     "(log: runs/x/logs/rank-0002.log)\n",
     "job 8: FAILED (exit code 1, NonZeroExitCode): hpcfl: rank 2 (site 'hospital-a', rank 1 of 2 in site) failed: "
     "OSError: [Errno 22] Invalid argument (log: runs/x/logs/rank-0002.log) (log: {run}/slurm/8.out)"),
    (None, ("COMPLETED", "None", "0:0"), "", "job 8: COMPLETED"),
    (None, ("TIMEOUT", "TimeLimit", "0:1"), "", "job 8: TIMEOUT (signal 1, TimeLimit)"),
])
def test_a_finished_job_reports_its_real_state_exit_code_and_error_line(tmp_path, capsys, fake_slurm, sacct, scontrol,
                                                                        log, expect):
    run = make_run(tmp_path)
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": "7"}, {"job_id": "8"}]))
    (run / "slurm" / "8.out").write_text(log)
    fake_slurm.set("squeue", "", rc=1, err=UNKNOWN)  # it has left the queue
    if sacct is None:
        fake_slurm.set("sacct", "", rc=1, err=NO_ACCOUNTING)
    else:
        fake_slurm.set("sacct", sacct)
    if scontrol is None:
        fake_slurm.set("scontrol", "", rc=1, err=UNKNOWN)
    else:
        fake_slurm.set("scontrol", scontrol_job(8, *scontrol, run))
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 0, err
    first = out.splitlines()[0]
    assert first.startswith(expect.format(run=run)), first
    assert "FINISHED" not in out
    assert out.splitlines()[1].startswith(f"{run}: interrupted, 2/5 rounds done")


def test_a_job_slurm_has_forgotten(tmp_path, capsys, fake_slurm):
    for name in ("squeue", "scontrol"):
        fake_slurm.set(name, "", rc=1, err=UNKNOWN)
    fake_slurm.set("sacct", "", rc=1, err=NO_ACCOUNTING)
    rc, out, err = run_cli(capsys, "status", "99999")
    assert rc != 0 and "job 99999: unknown to SLURM" in err and not out
    run = make_run(tmp_path)
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": "8"}]))
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 0 and out.startswith("job 8: no longer known to SLURM")
    fake_slurm.remove("sacct")  # no sacct at all: scontrol is asked
    fake_slurm.set("scontrol", scontrol_job(8, "CANCELLED", "None", "0:15", run))
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 0 and out.startswith("job 8: CANCELLED (signal 15)")


def test_cancel_calls_scancel_with_the_latest_job(tmp_path, capsys, fake_slurm):
    run = make_run(tmp_path)
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": "7"}, {"job_id": "8"}]))
    fake_slurm.set("scancel")
    rc, out, err = run_cli(capsys, "cancel", run)
    assert rc == 0 and out.strip() == "cancelled job 8" and "scancel 8" in fake_slurm.calls()
    rc, out, err = run_cli(capsys, "cancel", make_run(tmp_path, "local"))
    assert rc != 0 and "no SLURM job recorded" in err and "hpcfl stop" in err
