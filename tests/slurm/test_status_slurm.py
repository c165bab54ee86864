"""``hpcfl status`` on the local SLURM cluster (no accounting): a finished job's real state, exit code and error line
come from ``scontrol show job`` after the job has left the queue, not "FINISHED"."""
import json
import subprocess

from conftest import hold, hpcfl
from test_slurm import ENV, cluster, in_queue, submit, wait  # noqa: F401 - cluster is a fixture


def test_a_failed_job_is_reported_failed_with_its_exit_code_and_error_line(cluster, tmp_path):  # noqa: F811
    job = submit(tmp_path, "boom", "fl.rounds=3", "debug.inject_failure={rank: 2, round: 2}")
    run = tmp_path / "boom"
    st = hpcfl("status", run, env=ENV)
    assert st.returncode == 0 and st.stdout.split(":")[0] == f"job {job}", st.stdout + st.stderr
    wait(job)
    assert not in_queue(job)
    sacct = subprocess.run(["sacct", "-n", "-j", job], capture_output=True, text=True)
    assert sacct.returncode != 0 or not sacct.stdout.strip(), "this cluster was meant to run without accounting"
    st = hpcfl("status", run, env=ENV)
    assert st.returncode == 0, st.stderr
    head = st.stdout.splitlines()[0]
    assert head.startswith(f"job {job}: FAILED (exit code "), head
    assert "injected failure at round 2" in head and f"(log: {run / 'slurm' / (job + '.out')})" in head, head
    by_id = hpcfl("status", job, "--json", env=ENV)
    doc = json.loads(by_id.stdout)
    assert doc["job"]["state"] == "FAILED" and doc["job"]["source"] == "scontrol" and doc["job"]["exit_code"] != "0:0"
    assert doc["run"]["run_dir"] == str(run) and doc["run"]["last_round"] == 1


def test_a_cancelled_and_a_completed_job(cluster, tmp_path):  # noqa: F811
    long = submit(tmp_path, "long", "fl.rounds=200", hold(tmp_path / "hold", 2))  # cannot finish before the cancel
    done = submit(tmp_path, "done", "fl.rounds=1")
    r = hpcfl("cancel", tmp_path / "long", env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == f"cancelled job {long}", r.stderr
    wait(long)
    wait(done)
    st = hpcfl("status", tmp_path / "long", env=ENV)
    assert st.stdout.startswith(f"job {long}: CANCELLED"), st.stdout
    st = hpcfl("status", tmp_path / "done", env=ENV)
    assert st.stdout.startswith(f"job {done}: COMPLETED\n"), st.stdout
    assert "finished, 1/1 rounds done" in st.stdout
    r = hpcfl("status", "999999", env=ENV)
    assert r.returncode != 0 and "job 999999: unknown to SLURM" in r.stderr and "Traceback" not in r.stderr
