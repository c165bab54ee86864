"""Faults a federation must not sit through: a hung rank (SIGSTOP), a site whose training diverges."""
import json
import time

import numpy as np
import pytest
from conftest import hpcfl
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

BASE = ["fl.local_steps=4", "train.batch_size=16"]


def launch(tmp_path, name, *sets, rounds=3, timeout=240, config="configs/digits-2x2.yaml"):
    t = time.monotonic()
    r = hpcfl("launch", config, "--set", f"run.root={tmp_path}", "--set", f"run.name={name}",
              "--set", f"fl.rounds={rounds}", *[a for s in (*BASE, *sets) for a in ("--set", s)], timeout=timeout)
    r.elapsed = time.monotonic() - t
    return r


def test_a_stopped_rank_is_named_and_ends_the_job(tmp_path):
    # rank 4 (site b's second rank) stops itself (SIGSTOP) at the start of round 2: it is hung, not dead
    r = launch(tmp_path, "hung", "launch.slots=2", "fault.hang_timeout_s=8",
               "debug.inject_failure={rank: 4, round: 2, mode: stop}")
    assert r.returncode != 0
    assert r.elapsed < 120, f"the job took {r.elapsed:.0f}s to end"
    err = r.stderr
    assert "rank 4 (site 'hospital-b', rank 1 of 2 in site) made no progress for" in err, err
    assert "heartbeat stopped" in err and "ending the job (fault.hang_timeout_s)" in err, err
    logs = tmp_path / "hung" / "logs"
    # every rank that could still run wrote its Python stack to its log
    for rank in (0, 1, 2, 3):
        assert "Python stacks of rank" in (logs / f"rank-{rank:04d}.log").read_text(), rank
    assert json.loads((logs / "rank-0004.error.json").read_text())["type"] == "Hang"
    # the launcher's last line names the rank too
    assert "rank 4" in err.strip().splitlines()[-1]


def test_a_site_whose_update_is_not_finite_is_named(tmp_path):
    r = launch(tmp_path, "nan", "launch.slots=2", "sites.1.overrides.lr=1e30", rounds=2)
    assert r.returncode != 0
    assert "site(s) 'hospital-b' uploaded an update with NaN or inf" in r.stderr, r.stderr


def test_skip_site_leaves_a_diverging_site_out_and_records_it(tmp_path):
    r = launch(tmp_path, "skip", "sites={count: 3, ranks: 1}", "sites.1.overrides.lr=1e30", "fl.local_steps=12",
               "fault.nonfinite_update=skip_site", rounds=3, config="configs/digits.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "skip"
    strict = lambda x: json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # noqa: E731
    recs = [strict(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in recs if x["kind"] == "round"]
    for s in rounds:
        assert s["participants"] == ["site1", "site3"]
        assert s["dropped"] == {"site2": "nonfinite_update"}
    assert rounds[-1]["val_accuracy"] > 0.5  # the global model kept learning from the others
    train = [x for x in recs if x.get("split") == "train" and x["site"] == "site2"]
    assert train and all(x.get("finite") is False and x["loss"] is None for x in train)
    model = load_checkpoint(run / "checkpoints" / "round-000003.npz")["model"]
    assert all(np.isfinite(v).all() for v in model.values())
