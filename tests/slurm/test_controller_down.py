"""The local SLURM cluster with its daemons stopped (its slurm.conf left in place, as after `make test`): every
hpcfl command that asks SLURM answers within its deadline, says that the controller does not answer (exit code
3), and `hpcfl status RUN_DIR` still shows the run's progress. Before, `hpcfl status 99999999999` took 54 s and
then said the job was "unknown to SLURM"."""
import subprocess
import time

from conftest import ROOT, hpcfl
from test_slurm import ENV, cluster, submit, wait  # noqa: F401 - cluster is a fixture

DEADLINE = 4  # --slurm-timeout; squeue alone waits 18 s before it gives up on a stopped controller
SLACK = 15  # Python start-up and imports on a loaded 2-core machine


def timed(*args):
    t = time.monotonic()
    r = hpcfl(*args, env=ENV, timeout=120)
    return r, time.monotonic() - t


def test_every_command_answers_within_its_deadline_when_the_controller_is_down(cluster, tmp_path):  # noqa: F811
    job = submit(tmp_path, "before", "fl.rounds=2")
    wait(job)
    run = tmp_path / "before"
    stop = subprocess.run([str(ROOT / "scripts" / "local_slurm.sh"), "stop"], capture_output=True, text=True,
                          timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert subprocess.run(["pgrep", "-x", "slurmctld"]).returncode != 0
    t = ["--slurm-timeout", str(DEADLINE)]
    r, took = timed("status", run, *t)
    assert r.returncode == 3 and took < DEADLINE + SLACK, (took, r.stdout, r.stderr)
    head, *rest = r.stdout.splitlines()
    assert head.startswith(f"job {job}: SLURM's state is unknown: squeue: ") and "from the run directory" in head, head
    assert rest[0].startswith(f"{run}: finished, 2/2 rounds done"), r.stdout
    print(f"status RUN_DIR: {took:.1f}s")
    for args in (("status", "99999999999"), ("stop", job), ("cancel", run), ("cancel", job)):
        r, took = timed(*args, *t)
        print(f"{' '.join(map(str, args))}: {took:.1f}s")
        assert r.returncode == 3 and took < DEADLINE + SLACK, (args, took, r.stderr)
        line = r.stderr.strip()
        assert "\n" not in line and "unknown" not in line and "Traceback" not in line, (args, line)
        assert f"SLURM did not answer within {DEADLINE}s" in line or "controller does not answer" in line, (args, line)
    r, took = timed("submit", "configs/digits-2x2.yaml", f"--set=run.root={tmp_path}", "--set=run.name=after", *t)
    assert r.returncode == 3 and took < DEADLINE + SLACK, (took, r.stderr)
    assert r.stderr.strip().startswith("hpcfl: scontrol show node: "), r.stderr
    print(f"submit: {took:.1f}s")
    # the default deadline (10 s) holds too, and no command says "unknown to SLURM"
    r, took = timed("status", "99999999999")
    assert r.returncode == 3 and took < 10 + SLACK and "unknown to SLURM" not in r.stderr, (took, r.stderr)
    print(f"status JOBID, default deadline: {took:.1f}s: {r.stderr.strip()}")
