"""Site slots under a real mpirun: fewer process groups than sites, the same federation.

A slot trains its sites one after another, each from the global weights, with
everything per site (data, seeds, participation, private entries, secure
aggregation keys and masks, DP clipping) kept per site. So the number of slots
must not change what is learnt: with secure aggregation the sum is exact integer
arithmetic and the weights are bit-identical; without it, only the order of a
float sum differs.
"""
import json

import numpy as np
import pytest
from conftest import hpcfl
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

SIX = ["sites={count: 6, ranks: 1}", "fl.local_steps=4", "train.batch_size=16", "checkpoint.keep=20"]
EVERYTHING = ["fl.strategy=fedadam", "fl.server.lr=0.05", "fl.sampling.fraction=0.67", "sites.1.dropout=0.5",
              "sites.4.dropout=0.5", "privacy.exclude_vars=[3.bias]", "privacy.secure_aggregation=true",
              "privacy.dp={noise_multiplier: 0.2, clip_norm: 5.0}"]


def launch(tmp_path, name, *sets, rounds=3, timeout=300):
    return hpcfl("launch", "configs/digits.yaml", "--set", f"run.root={tmp_path}", "--set", f"run.name={name}",
                 "--set", f"fl.rounds={rounds}", *[a for s in sets for a in ("--set", s)], timeout=timeout)


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def site_metrics(run):
    return {(r["round"], r["site"], r["model"], r["split"]): r for r in records(run) if r["kind"] == "site"}


def model(run, r):
    return load_checkpoint(run / "checkpoints" / f"round-{r:06d}.npz")["model"]


def assert_same_runs(a, b, global_loss_rel=0.0):
    """Bit-identical weights every round; the same per-site metrics (the global model's validation loss
    to ``global_loss_rel``)."""
    for r in (1, 2, 3):
        wa, wb = model(a, r), model(b, r)
        for k in wa:
            assert np.array_equal(wa[k], wb[k]), (r, k)
    sa, sb = site_metrics(a), site_metrics(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        for field in ("status", "accuracy", "loss", "samples", "steps", "update_norm"):
            if global_loss_rel and key[2] == "global" and field == "loss":
                assert sa[key][field] == pytest.approx(sb[key][field], rel=global_loss_rel), key
            else:
                assert sa[key].get(field) == sb[key].get(field), (key, field)


def test_two_slots_simulate_six_sites_exactly_as_six(tmp_path):
    """FedAdam, sampling, dropout, exclude_vars, secure aggregation and DP: bit-identical weights and metrics."""
    a = launch(tmp_path, "six", *SIX, *EVERYTHING, "launch.slots=6")
    b = launch(tmp_path, "two", *SIX, *EVERYTHING, "launch.slots=2")
    assert a.returncode == 0, a.stdout + a.stderr
    assert b.returncode == 0, b.stdout + b.stderr
    assert "2 slot(s) simulating 6 sites (3 each, in turn" in b.stdout
    m6 = json.loads((tmp_path / "six" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m6["world_size"] == 7 and m2["world_size"] == 3
    solo = {"backend": "none (1-rank slots)"}  # the backend each slot really used
    assert m2["slots"] == [{"ranks": [1], "sites": ["site1", "site2", "site3"], "backend": solo},
                           {"ranks": [2], "sites": ["site4", "site5", "site6"], "backend": solo}]
    assert_same_runs(tmp_path / "six", tmp_path / "two")
    ra = [x for x in records(tmp_path / "six") if x["kind"] == "round"]
    rb = [x for x in records(tmp_path / "two") if x["kind"] == "round"]
    assert [x["participants"] for x in ra] == [x["participants"] for x in rb]
    assert any(x["dropped"] for x in ra)  # sampling and dropout were really in play
    assert [x["dp_epsilon"] for x in ra] == [x["dp_epsilon"] for x in rb]
    # exclude_vars: every site keeps its own 3.bias, per site, in either layout
    priv = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("site-*-private-round-000003.npy"))
    assert priv == [f"site-site{i}-private-round-000003.npy" for i in range(1, 7)]
    for i in range(1, 7):
        pa = np.load(tmp_path / "six" / "checkpoints" / f"site-site{i}-private-round-000003.npy")
        pb = np.load(tmp_path / "two" / "checkpoints" / f"site-site{i}-private-round-000003.npy")
        assert np.array_equal(pa, pb)
    ca = json.loads((tmp_path / "six" / "cross_site.json").read_text())
    cb = json.loads((tmp_path / "two" / "cross_site.json").read_text())
    assert ca == cb


def test_slots_change_only_the_order_of_a_float_sum(tmp_path):
    """Plain FedAvg: a slot adds its sites' weighted updates before the Reduce (fewer bytes): the same
    weights to float tolerance, the same per-site local training in round 1."""
    a = launch(tmp_path, "six", *SIX, "launch.slots=6", rounds=2)
    b = launch(tmp_path, "two", *SIX, "launch.slots=2", rounds=2)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    for r in (1, 2):
        wa, wb = model(tmp_path / "six", r), model(tmp_path / "two", r)
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=f"round {r} {k}")
    sa, sb = site_metrics(tmp_path / "six"), site_metrics(tmp_path / "two")
    for key in sa:
        if key[0] == 1 and key[2] == "local":  # round 1 starts from the same weights: local training is identical
            assert sa[key]["loss"] == sb[key]["loss"], key


def test_64_sites_on_this_machine(tmp_path):
    r = launch(tmp_path, "k64", "sites={count: 64, ranks: 1}", "fl.local_epochs=2", "train.batch_size=8",
               "eval.cross_site=false", rounds=3, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "k64"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["sites"] == 64 and len(manifest["slots"]) <= 2 and manifest["world_size"] == 1 + len(
        manifest["slots"])
    recs = records(run)
    for rnd in (1, 2, 3):
        sites = {x["site"] for x in recs if x["kind"] == "site" and x["round"] == rnd and x["model"] == "global"}
        assert len(sites) == 64
    summary = [x for x in recs if x["kind"] == "round"]
    assert [s["sites_done"] for s in summary] == [64, 64, 64]
    assert summary[-1]["val_accuracy"] > 0.5  # it learns (10 classes: chance is 0.1)


def test_kill_and_resume_with_slots_is_bit_identical(tmp_path):
    sets = [*SIX, "launch.slots=2", "fl.strategy=fedadam", "fl.sampling.fraction=0.5", "privacy.exclude_vars=[3.bias]"]
    a = launch(tmp_path, "straight", *sets, rounds=4)
    assert a.returncode == 0, a.stderr
    b = launch(tmp_path, "resumed", *sets, "debug.inject_failure={rank: 2, round: 3, mode: kill}", rounds=4)
    assert b.returncode != 0 and "was killed by signal 9" in b.stderr
    c = launch(tmp_path, "resumed", *sets, rounds=4)
    assert c.returncode == 0, c.stderr
    assert "resuming after round 2" in c.stdout
    wa, wc = model(tmp_path / "straight", 4), model(tmp_path / "resumed", 4)
    for k in wa:
        assert np.array_equal(wa[k], wc[k]), k


def test_balanced_slots_are_bit_identical_to_one_slot_per_site(tmp_path):
    """launch.assign: balanced deals each round's sampled sites to 2 slots by work (quantity skew makes the
    sites' work differ); with secure aggregation the sum is exact, so weights, metrics and cross-site
    validation match one slot per site bit for bit."""
    sets = [*SIX, "data.partition=quantity", "data.dirichlet_alpha=0.5", "fl.local_epochs=1",
            *[e for e in EVERYTHING if "exclude_vars" not in e]]
    a = launch(tmp_path, "six", *sets, "launch.slots=6")
    b = launch(tmp_path, "two", *sets, "launch.slots=2", "launch.assign=balanced")
    assert a.returncode == 0, a.stdout + a.stderr
    assert b.returncode == 0, b.stdout + b.stderr
    # a slot evaluates its sites in one pass, where the global model's loss sums batch differently
    assert_same_runs(tmp_path / "six", tmp_path / "two", global_loss_rel=1e-6)
    rb = [x for x in records(tmp_path / "two") if x["kind"] == "round"]
    assert all("straggler_s" in x["time"] for x in rb)
    sizes = {x["site"]: x["samples"] for x in records(tmp_path / "two") if x["kind"] == "site" and x["split"] == "train"}
    assert len(set(sizes.values())) > 2  # quantity skew: the sites really differ in work
    ca = json.loads((tmp_path / "six" / "cross_site.json").read_text())
    cb = json.loads((tmp_path / "two" / "cross_site.json").read_text())
    assert ca.keys() == cb.keys() and ca["models"].keys() == cb["models"].keys()
    for m, row in ca["models"].items():
        for site, cell in row.items():
            assert cell["accuracy"] == cb["models"][m][site]["accuracy"], (m, site)
            assert cell["loss"] == pytest.approx(cb["models"][m][site]["loss"], rel=1e-6), (m, site)
