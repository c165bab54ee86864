"""The federation under a real mpirun: 5 ranks = aggregator + 2 sites of 2 ranks (one slot per site,
``launch.slots=2``: on this 2-core machine the automatic choice would be one slot of 2 ranks), for both
site backends (Horovod process sets and torch.distributed groups)."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, hpcfl
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

FAST = ["fl.local_steps=6", "train.batch_size=16", "launch.slots=2"]
BACKENDS = ["horovod", "torch"]


def launch(tmp_path, name, *sets, rounds=3, timeout=240):
    t = time.monotonic()
    r = hpcfl("launch", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", "--set", f"run.name={name}",
              "--set", f"fl.rounds={rounds}", *[a for s in (*FAST, *sets) for a in ("--set", s)], timeout=timeout)
    r.elapsed = time.monotonic() - t
    return r


def ckpt(run, round_):
    return load_checkpoint(run / "checkpoints" / f"round-{round_:06d}.npz")


def flat(state):
    return np.concatenate([v.ravel() for v in state.values()])  # entries are stored in flat-buffer order


@pytest.mark.parametrize("backend", BACKENDS)
def test_site_replicas_agree_and_rank0_holds_the_weighted_mean(tmp_path, backend):
    # site b trains fewer steps (a per-site override), so the sites also finish at different times
    r = launch(tmp_path, "agg", "debug.save_local_weights=true", "sites.1.overrides.local_steps=2",
               f"site.backend={backend}", rounds=2)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "agg"
    manifest = json.loads((run / "manifest.json").read_text())
    n = {s: v["train"] for s, v in manifest["partition"]["sites"].items()}
    for rnd in (1, 2):
        w = {rank: np.load(run / "debug" / f"round-{rnd:06d}-rank-{rank:04d}.npy") for rank in (1, 2, 3, 4)}
        # every rank of a site holds the same weights after local training (Horovod kept them in sync)
        np.testing.assert_array_equal(w[1], w[2])
        np.testing.assert_array_equal(w[3], w[4])
        assert not np.array_equal(w[1], w[3])  # the two sites trained on different data
        # rank 0's new global model is the sample-weighted mean of the leaders' uploads
        na, nb = n["hospital-a"], n["hospital-b"]
        expected = (na * w[1].astype(np.float64) + nb * w[3].astype(np.float64)) / (na + nb)
        np.testing.assert_allclose(flat(ckpt(run, rnd)["model"]), expected, rtol=1e-5, atol=1e-6)

    # the run directory
    ranks = manifest["ranks"]
    assert [(x["rank"], x["role"], x["site"], x["rank_in_site"]) for x in ranks] == [
        (0, "aggregator", None, None), (1, "site", "hospital-a", 0), (2, "site", "hospital-a", 1),
        (3, "site", "hospital-b", 0), (4, "site", "hospital-b", 1)]
    assert all(x["cpu_affinity"] and x["pid"] for x in ranks)
    assert "torch" not in ranks[0]["versions"]  # the aggregator works on arrays: no torch start-up cost
    assert json.loads((run / "summary.json").read_text())["aggregator_imported_torch"] is False
    assert all(x["versions"]["torch"] for x in ranks[1:])
    if backend == "horovod":
        assert ranks[1]["versions"]["horovod"] == "0.28.1" and ranks[1]["backend"]["backend"] == "horovod"
    else:
        assert ranks[1]["backend"] == {"backend": "torch.distributed", "transport": "gloo",
                                       "torch": ranks[1]["versions"]["torch"], "why": "ranks train on the CPU",
                                       "host_staged": False}
        assert [s["backend"]["transport"] for s in manifest["slots"]] == ["gloo", "gloo"]  # as each slot ran
    assert ranks[1]["device"]["type"] == "cpu" and ranks[1]["precision"] == "fp32"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * (2 * 3 + 1)  # per site: global on val, local on val (locally tuned), train; + round
    steps = {(x["site"], x["round"]): x["steps"] for x in recs if x.get("split") == "train"}
    assert steps == {("hospital-a", 1): 6, ("hospital-a", 2): 6, ("hospital-b", 1): 2, ("hospital-b", 2): 2}
    summary = [x for x in recs if x["kind"] == "round"]
    assert [s["round"] for s in summary] == [1, 2] and summary[0]["sites_done"] == 2
    for key in ("send_s", "site_bcast_s", "train_s", "data_s", "compute_s", "allreduce_s", "upload_s",
                "aggregate_s", "eval_s", "checkpoint_s", "round_s", "overhead_s"):
        assert summary[1]["time"][key] >= 0.0
    assert summary[1]["time"]["allreduce_s"] > 0  # 2-rank sites really allreduce
    assert (run / "config.yaml").exists() and (run / "summary.json").exists()
    assert all((run / "logs" / f"rank-{k:04d}.log").exists() for k in range(5))
    assert "where the time goes" in r.stdout and f"run directory: {run}" in r.stdout


def test_both_backends_give_the_same_weights(tmp_path):
    runs = {b: launch(tmp_path, b, f"site.backend={b}", rounds=2) for b in BACKENDS}
    for b, r in runs.items():
        assert r.returncode == 0, r.stdout + r.stderr
    wh, wt = ckpt(tmp_path / "horovod", 2)["model"], ckpt(tmp_path / "torch", 2)["model"]
    for k in wh:
        np.testing.assert_allclose(wh[k], wt[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_an_exception_on_one_site_rank_ends_the_job_quickly(tmp_path):
    r = launch(tmp_path, "boom", "debug.inject_failure={rank: 4, round: 2}")
    assert r.returncode != 0
    assert r.elapsed < 90, f"job took {r.elapsed:.0f}s to end"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hpcfl: rank 4 (site 'hospital-b', rank 1 of 2 in site) failed: "
                           "injected failure at round 2 (debug.inject_failure)"), r.stderr
    logs = tmp_path / "boom" / "logs"
    assert "Traceback" in (logs / "rank-0004.log").read_text()
    assert json.loads((logs / "rank-0004.error.json").read_text())["site"] == "hospital-b"


def test_a_killed_rank_ends_the_job_quickly(tmp_path):
    r = launch(tmp_path, "kill", "debug.inject_failure={rank: 2, round: 2, mode: kill}")
    assert r.returncode != 0
    assert r.elapsed < 90, f"job took {r.elapsed:.0f}s to end"
    last = r.stderr.strip().splitlines()[-1]
    assert last == "hpcfl: rank 2 (site 'hospital-a', rank 1 of 2 in site) was killed by signal 9 (Killed)", r.stderr


def test_kill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    a = launch(tmp_path, "straight", rounds=4)
    assert a.returncode == 0, a.stderr
    b = launch(tmp_path, "resumed", "debug.inject_failure={rank: 0, round: 3, mode: kill}", rounds=4)
    assert b.returncode != 0
    assert "rank 0 (aggregator) was killed by signal 9" in b.stderr
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("round-*.npz"))[-1] == "round-000002.npz"
    c = launch(tmp_path, "resumed", rounds=4)  # a plain relaunch into the run directory resumes
    assert c.returncode == 0, c.stderr
    assert "resuming after round 2" in c.stdout
    wa, wc = ckpt(tmp_path / "straight", 4)["model"], ckpt(tmp_path / "resumed", 4)["model"]
    assert wa.keys() == wc.keys()
    for k in wa:
        assert np.array_equal(wa[k], wc[k]) and wa[k].dtype == np.float32, k  # bit-identical
    recs = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    acc = lambda run: [(x["round"], x["val_accuracy"]) for x in recs(run) if x["kind"] == "round"]
    assert acc("resumed") == acc("straight")
    # a relaunch of a finished run has nothing to do, and gives the run directory's lock back
    e = launch(tmp_path, "resumed", rounds=4)
    assert e.returncode == 0 and "nothing to do" in e.stdout, e.stdout + e.stderr
    assert not (tmp_path / "resumed" / "run.lock").exists()
    # a changed config is refused before any rank starts
    d = hpcfl("launch", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", "--set", "run.name=resumed",
              "--set", "fl.rounds=4", *[a for s in FAST for a in ("--set", s)], "--set", "train.lr=0.3")
    assert d.returncode == 2 and "holds a run of a different config (train.lr: 0.1 -> 0.3)" in d.stderr


def test_wrong_rank_count_under_plain_mpirun_is_one_clear_line(tmp_path):
    r = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "4", sys.executable, "-m", "hpcfl",
                        "run", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    expected = ("hpcfl: rank 0 failed: the job has 4 ranks, but the config's 2 sites run on 3, 5 ranks "
                "(1 aggregator + 1..2 slots)")
    assert r.stderr.count(expected) == 1, r.stderr


def test_quickstart_learns_digits(tmp_path):
    r = hpcfl("launch", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", timeout=300)
    assert r.returncode == 0, r.stderr
    final = json.loads((tmp_path / "digits-2x2" / "summary.json").read_text())["final"]
    assert final["round"] == 8 and final["val_accuracy"] >= 0.9


def test_site_ranks_pin_themselves_to_different_cores(tmp_path):
    """3 ranks on this 2-core machine: mpirun does not bind them, so each site rank pins itself
    to a core of its place; manifest.json records what the OS reports, not the plan."""
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    r = hpcfl("launch", "configs/digits.yaml", "--set", f"run.root={tmp_path}", "--set", "fl.rounds=1")
    assert r.returncode == 0, r.stderr
    ranks = json.loads((tmp_path / "digits" / "manifest.json").read_text())["ranks"]
    a, b = ranks[1]["cpu_affinity"], ranks[2]["cpu_affinity"]
    assert len(a) == 1 and len(b) == 1 and a != b
    assert ranks[1]["torch_threads"] == 1
