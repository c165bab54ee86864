"""SLURM client calls with a deadline, on fake clients: a controller that does not answer (a client that hangs,
or one that says "Unable to contact slurm controller") is named in one line with exit code 3, never taken for
"SLURM does not know this job"; ``hpcfl status RUN_DIR`` then shows the run directory's progress."""
import json
import time

import pytest

from hpcfl.cluster import slurmcmd
from test_status import UNKNOWN, fake_slurm, make_run, run_cli  # noqa: F401 - fake_slurm is a fixture

DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"
HANG = "#!/bin/sh\necho \"$(/usr/bin/basename $0) $*\" >> \"$FAKE_SLURM/calls.log\"\nexec /bin/sleep 30\n"


@pytest.fixture(autouse=True)
def _default_deadline():
    slurmcmd.set_deadline(None)
    yield
    slurmcmd.set_deadline(None)


def hang(fake, *names):
    for name in names:
        (fake.dir / name).write_text(HANG)
        (fake.dir / name).chmod(0o755)


def with_job(tmp_path, job="8"):
    run = make_run(tmp_path)
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": job}]))
    return run


def test_a_controller_that_says_it_is_down_is_not_an_unknown_job(tmp_path, capsys, fake_slurm):
    for name in ("squeue", "scontrol", "sacct"):
        fake_slurm.set(name, "", rc=1, err=DOWN)
    rc, out, err = run_cli(capsys, "status", "99999999999")
    assert rc == 3 and not out, (rc, out, err)
    assert err.strip() == ("hpcfl: scontrol show job: SLURM's controller does not answer: slurm_load_jobs error: "
                           "Unable to contact slurm controller (connect failure)")
    run = with_job(tmp_path)
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 3, err
    lines = out.splitlines()
    assert lines[0] == ("job 8: SLURM's state is unknown: squeue: SLURM's controller does not answer: slurm_load_jobs "
                        "error: Unable to contact slurm controller (connect failure); from the run directory:")
    assert lines[1].startswith(f"{run}: ") and "2/5 rounds done" in lines[1]
    assert [c.split()[0] for c in fake_slurm.calls()].count("squeue") == 1  # nothing else asked after squeue
    rc, out, err = run_cli(capsys, "status", run, "--json")
    assert rc == 3 and json.loads(out)["job"]["unreachable"].startswith("squeue: SLURM's controller does not answer")
    for cmd in ("cancel", "stop"):
        rc, out, err = run_cli(capsys, cmd, "8")
        assert rc == 3 and "controller does not answer" in err and "unknown" not in err, (cmd, err)
    fake_slurm.set("scancel", "", rc=1, err="scancel: error: Kill job error on job id 8: Unable to contact slurm "
                                            "controller (connect failure)\n")
    rc, out, err = run_cli(capsys, "cancel", run)
    assert rc == 3 and err.startswith("hpcfl: scancel: SLURM's controller does not answer: scancel: error: Kill job")


def test_a_client_that_hangs_is_ended_at_the_deadline(tmp_path, capsys, fake_slurm, monkeypatch):
    hang(fake_slurm, "squeue", "scontrol", "sacct", "scancel")
    run = with_job(tmp_path)
    t = time.monotonic()
    rc, out, err = run_cli(capsys, "status", run, "--slurm-timeout", "0.5")
    took = time.monotonic() - t
    assert rc == 3 and out.startswith("job 8: SLURM's state is unknown: squeue: SLURM did not answer within 0.5s; "
                                      "its controller is down or overloaded"), out
    assert "2/5 rounds done" in out
    assert took < 20  # one deadline (the client sleeps 30 s), not one per command
    monkeypatch.setenv("HPCFL_SLURM_TIMEOUT_S", "0.5")
    rc, out, err = run_cli(capsys, "status", "12345")
    assert rc == 3 and err.startswith("hpcfl: scontrol show job: SLURM did not answer within 0.5s"), err
    rc, out, err = run_cli(capsys, "cancel", run)
    assert rc == 3 and err.startswith("hpcfl: scancel: SLURM did not answer within 0.5s"), err
    monkeypatch.setenv("HPCFL_SLURM_TIMEOUT_S", "soon")
    rc, out, err = run_cli(capsys, "status", "12345")
    assert rc == 2 and err.strip() == "hpcfl: HPCFL_SLURM_TIMEOUT_S='soon': not a positive number of seconds"
    rc, out, err = run_cli(capsys, "status", "12345", "--slurm-timeout", "-1")
    assert rc == 2 and "--slurm-timeout: -1.0 is not a positive number of seconds" in err


def test_unknown_job_and_accounting_down(tmp_path, capsys, fake_slurm):
    for name in ("squeue", "scontrol"):
        fake_slurm.set(name, "", rc=1, err=UNKNOWN)
    fake_slurm.set("sacct", "", rc=1, err="sacct: error: Problem talking to the database: Connection refused\n")
    run = with_job(tmp_path)
    # the controller answers that the job has left the queue and it forgot it; accounting, which would know, is down
    rc, out, err = run_cli(capsys, "status", run)
    assert rc == 3 and out.startswith("job 8: SLURM's state is unknown: job 8 has left the queue and the accounting "
                                      "database does not answer (sacct: SLURM's controller does not answer: sacct: "
                                      "error: Problem talking to the database: Connection refused)"), out
    fake_slurm.set("sacct", "", rc=1, err="sacct: error: Slurm accounting storage is disabled\n")
    rc, out, err = run_cli(capsys, "status", "99999")
    assert rc == 2 and "job 99999: unknown to SLURM" in err  # the truth: every source answered and none knows it


def test_sbatch_without_an_answer_says_the_job_may_exist(tmp_path, capsys, fake_slurm):
    hang(fake_slurm, "sbatch")
    fake_slurm.set("scontrol", "", rc=1, err="")  # the node shape: not asked (the config describes it)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sites: [{{name: a, ranks: 1}}]\nrun: {{root: {tmp_path}}}\n"
                   "cluster: {sockets_per_node: 1, cores_per_socket: 2, gpus_per_node: 0, aggregator_cores: 0}\n")
    rc, out, err = run_cli(capsys, "submit", cfg, "--slurm-timeout", "0.5")
    assert rc == 3 and "sbatch: SLURM did not answer within 0.5s" in err and "may have been submitted" in err, err


def test_sbatch_that_says_it_failed_submitted_nothing(tmp_path, capsys, fake_slurm):
    (fake_slurm.dir / "sbatch").write_text((fake_slurm.dir / "squeue").read_text())
    (fake_slurm.dir / "sbatch").chmod(0o755)
    fake_slurm.set("sbatch", "", rc=1, err="sbatch: error: Batch job submission failed: Zero Bytes were transmitted "
                                           "or received\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sites: [{{name: a, ranks: 1}}]\nrun: {{root: {tmp_path}}}\n"
                   "cluster: {sockets_per_node: 1, cores_per_socket: 2, gpus_per_node: 0, aggregator_cores: 0}\n")
    fake_slurm.set("scontrol", "", rc=1, err="")
    rc, out, err = run_cli(capsys, "submit", cfg)
    assert rc == 3 and err.strip().splitlines()[-1] == (
        "hpcfl: sbatch: SLURM's controller does not answer: sbatch: error: Batch job submission failed: Zero Bytes "
        "were transmitted or received"), err
