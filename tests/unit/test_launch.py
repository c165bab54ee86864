from pathlib import Path
import json

from hpcfl.config import from_dict
from hpcfl.launch import failure_line, mpirun_argv, rank_argv

CFG = from_dict({"sites": [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 2}]}, "q.yaml")


def test_mpirun_argv_oversubscribed_as_root():
    argv = mpirun_argv(CFG, rank_argv("q.yaml", ["fl.rounds=2"], python="py"), cores=2, as_root=True)
    assert argv[:4] == ["mpirun", "-np", "5", "--allow-run-as-root"]
    assert "--oversubscribe" in argv and argv[argv.index("--bind-to") + 1] == "none"
    assert "OMP_NUM_THREADS=1" in argv
    assert argv[-7:] == ["py", "-m", "hpcfl", "run", "q.yaml", "--set", "fl.rounds=2"]


def test_mpirun_argv_enough_cores_not_root():
    argv = mpirun_argv(CFG, ["x"], cores=64, as_root=False)
    assert "--oversubscribe" not in argv and "--allow-run-as-root" not in argv
    assert "OMP_NUM_THREADS=12" in argv
    assert rank_argv("c.yaml", resume=True, python="p")[-1] == "--resume"


def test_failure_line_prefers_the_earliest_rank_error(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank-0004.error.json").write_text(json.dumps({"rank": 4, "time": 2.0, "line": "hpcfl: rank 4 late"}))
    (logs / "rank-0002.error.json").write_text(json.dumps({"rank": 2, "time": 1.0, "line": "hpcfl: rank 2 first"}))
    assert failure_line(CFG, tmp_path, "", 1).startswith("hpcfl: rank 2 first (log: ")


def test_failure_line_names_a_killed_rank_and_its_site(tmp_path):
    out = "mpirun noticed that process rank 3 with PID 1234 on node vm exited on signal 9 (Killed).\n"
    assert failure_line(CFG, tmp_path, out, 137) == \
        "hpcfl: rank 3 (site 'b', rank 0 of 2 in site) was killed by signal 9 (Killed)"
    assert "exit code 1" in failure_line(CFG, tmp_path, "", 1)
