"""Strategies, participation, privacy and evaluation under a real mpirun: aggregator + 4 one-rank sites.

Each test checks what rank 0 actually computed against the pure functions,
fed with the updates the sites really uploaded (debug.save_local_weights).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, hold, hpcfl
from hpcfl.aggregation import make_strategy
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

BASE = ["sites={count: 4, ranks: 1}", "fl.local_steps=5", "train.batch_size=16", "checkpoint.keep=20",
        "data.partition=dirichlet", "data.dirichlet_alpha=1.0"]


def args(tmp_path, name, sets, rounds):
    return ["configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", "--set", f"run.name={name}",
            "--set", f"fl.rounds={rounds}", *[a for s in (*BASE, *sets) for a in ("--set", s)]]


def launch(tmp_path, name, *sets, rounds=2, timeout=240):
    return hpcfl("launch", *args(tmp_path, name, sets, rounds), timeout=timeout)


def ckpt(run, r):
    return load_checkpoint(run / "checkpoints" / f"round-{r:06d}.npz")


def flat(state):
    return np.concatenate([v.ravel() for v in state.values()])


def local(run, r, rank):
    return np.load(run / "debug" / f"round-{r:06d}-rank-{rank:04d}.npy")


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def site_sizes(run):
    part = json.loads((run / "manifest.json").read_text())["partition"]["sites"]
    return np.array([part[f"site{i}"]["train"] for i in range(1, 5)], float)


PARAMS = {"server_lr": 0.5, "server_momentum": 0.9, "beta2": 0.99, "tau": 1e-3, "trim_fraction": 0.25,
          "byzantine": 0, "krum_keep": 2}
SETS = {"fedavgm": ["fl.server.lr=0.5"], "fedadam": ["fl.server.lr=0.5"], "fedyogi": ["fl.server.lr=0.5"],
        "trimmed_mean": ["fl.robust.trim_fraction=0.25"], "krum": ["fl.robust.krum_keep=2"], "median": []}


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "median", "trimmed_mean", "krum"])
def test_rank0_applies_the_strategy_to_the_uploaded_updates(tmp_path, name):
    r = launch(tmp_path, name, f"fl.strategy={name}", "debug.save_local_weights=true", *SETS[name], rounds=3)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / name
    n = site_sizes(run)
    for rnd in (2, 3):  # round 2 already carries server state (momentum, moments) from round 1
        before, after = ckpt(run, rnd - 1), ckpt(run, rnd)
        prev = flat(before["model"])
        d = np.stack([local(run, rnd, k) - prev for k in range(1, 5)])
        s = make_strategy(name, PARAMS)
        s.load_state_dict(before["strategy"])
        if s.kind == "mean":
            agg = (n[:, None] * d.astype(np.float64)).sum(0) / n.sum()
        elif s.kind == "coordinate":
            s.begin_round(4)
            agg = np.empty(d.shape[1], np.float32)
            s.aggregate_chunk(d, n, agg)
        else:
            s.begin_round(4)
            s.accumulate_distances(d)
            keep = s.select(n)
            assert keep.sum() == 2
            rec = [x for x in records(run) if x["kind"] == "round" and x["round"] == rnd][0]
            assert rec["krum_kept"] == [f"site{i + 1}" for i in np.flatnonzero(keep)]
            agg = (n[keep, None] * d[keep]).sum(0) / n[keep].sum()
        w = prev.copy()
        s.finalize(agg.astype(np.float32), w, rnd)
        np.testing.assert_allclose(flat(after["model"]), w, rtol=1e-4, atol=2e-5)
        for k, v in s.state_dict().items():  # and the checkpointed server state is the state after the round
            np.testing.assert_allclose(after["strategy"][k], v, rtol=1e-4, atol=1e-6)


def test_fedprox_keeps_local_models_closer_to_the_global_one(tmp_path):
    a = launch(tmp_path, "avg", rounds=1)
    b = launch(tmp_path, "prox", "fl.strategy=fedprox", "fl.proximal_mu=5.0", rounds=1)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    norms = lambda run: [x["update_norm"] for x in records(tmp_path / run) if x.get("split") == "train"]
    assert all(p < 0.9 * q for p, q in zip(norms("prox"), norms("avg"))), (norms("prox"), norms("avg"))


PARTICIPATION = ["fl.sampling.fraction=0.75", "sites.0.dropout=0.5", "sites.3.speed=0.25",
                 "fl.stragglers.deadline_s=10", "fl.min_sites=1"]


def test_sampling_dropout_and_stragglers_are_seeded_and_only_returning_sites_count(tmp_path):
    r = launch(tmp_path, "part", *PARTICIPATION, "debug.save_local_weights=true", rounds=4)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "part"
    n = site_sizes(run)
    rounds = [x for x in records(run) if x["kind"] == "round"]
    for rec in rounds:
        # 3 of 4 sampled; site4 needs 5 steps / 0.25 = 20 simulated s > deadline 10 s: it never returns
        # "dropped" names the sampled sites that did not return; the one not sampled is only counted
        assert len(rec["participants"]) + len(rec["dropped"]) == 3 and rec["not_sampled"] == 1
        assert rec["sites_sampled"] == 3
        assert "site4" not in rec["participants"]
        if "site4" in rec["dropped"]:
            assert rec["dropped"]["site4"] == "straggler"
        assert set(rec["dropped"].values()) <= {"dropout", "straggler"}
    assert any(v == "dropout" for rec in rounds for v in rec["dropped"].values())
    for rnd in (2, 3, 4):
        rec = rounds[rnd - 1]
        prev = flat(ckpt(run, rnd - 1)["model"])
        back = [int(s[4:]) - 1 for s in rec["participants"]]
        d = np.stack([local(run, rnd, k + 1) - prev for k in back])
        expected = prev + (n[back, None] * d).sum(0) / n[back].sum()
        np.testing.assert_allclose(flat(ckpt(run, rnd)["model"]), expected, rtol=1e-5, atol=1e-6)
        for k in set(range(4)) - set(back):  # a site that did not take part did not train
            np.testing.assert_array_equal(local(run, rnd, k + 1), prev)
    # the site records say who returned and why the others did not
    site = [x for x in records(run) if x["kind"] == "site" and x["model"] == "global" and x["round"] == 1]
    assert {x["site"]: x["status"] for x in site} == {
        s: ("returned" if s in rounds[0]["participants"] else rounds[0]["dropped"].get(s, "not_sampled")) for s in
        ["site1", "site2", "site3", "site4"]}
    # same seed, same plans
    again = launch(tmp_path, "part2", *PARTICIPATION, rounds=4)
    assert again.returncode == 0
    plans = lambda name: [(x["participants"], x["dropped"]) for x in records(tmp_path / name) if x["kind"] == "round"]
    assert plans("part") == plans("part2")


def test_too_few_sites_fails_the_round_in_one_line(tmp_path):
    r = launch(tmp_path, "few", "fl.min_sites=4", "sites.1.dropout=1.0", "fl.on_too_few=fail")
    assert r.returncode != 0
    assert "round 1: only 3 of 4 sites returned, fewer than fl.min_sites = 4 (site2: dropout)" in r.stderr, r.stderr
    s = launch(tmp_path, "skip", "fl.min_sites=4", "sites.1.dropout=1.0", "fl.on_too_few=skip", rounds=2)
    assert s.returncode == 0, s.stderr
    assert "too few returned: global model unchanged" in s.stdout


def test_secure_aggregation_gives_the_plain_sum_even_when_a_masked_site_drops(tmp_path):
    sets = [*PARTICIPATION]
    plain = launch(tmp_path, "plain", *sets, rounds=3)
    masked = launch(tmp_path, "masked", *sets, "privacy.secure_aggregation=true", "debug.save_local_weights=true",
                    rounds=3)
    assert plain.returncode == 0 and masked.returncode == 0, masked.stdout + masked.stderr
    # what rank 0 received from each site: every byte uniform (chi-square), unlike the update it hides
    from scipy.stats import chisquare

    uploads = sorted((tmp_path / "masked" / "debug").glob("upload-round-*-site-*.npy"))
    assert len(uploads) >= 3
    for path in uploads:
        u = np.load(path)
        assert u.dtype == np.uint64 and u.size > 5000
        b = u.view(np.uint8).reshape(-1, 8)
        for k in range(8):
            assert chisquare(np.bincount(b[:, k], minlength=256)).pvalue > 1e-6, (path.name, k)  # 72 tests: no flakes
    rec = [x for x in records(tmp_path / "masked") if x["kind"] == "round"]
    # sampled sites dropped after masks were set up: their masks had to be recovered
    assert any(v in ("dropout", "straggler") for x in rec for v in x["dropped"].values())
    a, b = flat(ckpt(tmp_path / "plain", 3)["model"]), flat(ckpt(tmp_path / "masked", 3)["model"])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_exclude_vars_and_percentile_privacy(tmp_path):
    r = launch(tmp_path, "pv", "privacy.exclude_vars=['^3\\.']", "privacy.percentile={percent: 20, gamma: 0.002}",
               "debug.save_local_weights=true", rounds=3)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "pv"
    g = {r_: ckpt(run, r_)["model"] for r_ in (1, 2, 3)}
    names = list(g[1])
    excl = [k for k in names if k.startswith("3.")]
    assert excl and len(excl) < len(names)
    shared = [k for k in names if k not in excl]
    for k in excl:  # never shared: the global copy keeps its initial value
        np.testing.assert_array_equal(g[1][k], g[3][k])
    for rnd in (2, 3):
        step = np.concatenate([(g[rnd][k] - g[rnd - 1][k]).ravel() for k in shared])
        assert np.abs(step).max() <= 0.002 + 1e-7  # every shared update is clipped at gamma: so is their mean
        assert np.mean(step != 0) < 0.8  # and only the largest 20% of each site's update is shared
    # each site keeps its own values of the excluded parameters (they differ between sites)
    offs = np.cumsum([0] + [g[1][k].size for k in names])
    i = names.index(excl[0])
    vals = [local(run, 3, k)[offs[i]:offs[i + 1]] for k in range(1, 5)]
    assert not np.array_equal(vals[0], vals[1])
    assert not np.array_equal(vals[0], g[3][excl[0]].ravel())


def test_dp_fedavg_clips_adds_noise_and_reports_the_accountants_epsilon(tmp_path):
    from hpcfl.privacy.dp import epsilon

    r = launch(tmp_path, "dp", "privacy.dp={noise_multiplier: 0.8, clip_norm: 0.5, delta: 1.0e-5}", rounds=3)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = [x for x in records(tmp_path / "dp") if x["kind"] == "round"]
    for x in rec:
        assert x["dp_epsilon"] == pytest.approx(epsilon(0.8, 1.0, x["round"], 1e-5), rel=1e-9)
        assert x["dp_clip_norm"] == 0.5
    assert "eps " in r.stdout
    # no noise: the global step is a mean of updates clipped to C, so its norm is at most C
    z = launch(tmp_path, "clip", "privacy.dp={noise_multiplier: 0.0, clip_norm: 0.05}", rounds=2)
    assert z.returncode == 0, z.stderr
    step = flat(ckpt(tmp_path / "clip", 2)["model"]) - flat(ckpt(tmp_path / "clip", 1)["model"])
    assert 0.01 < np.linalg.norm(step) <= 0.05 * (1 + 1e-5)
    # adaptive clipping moves C toward the median update norm
    a = launch(tmp_path, "adaptive", "privacy.dp={noise_multiplier: 0.5, clip_norm: 5.0, adaptive: true, count_noise_multiplier: 1.0, clip_lr: 1.0}", rounds=3)
    assert a.returncode == 0, a.stderr
    rec = [x for x in records(tmp_path / "adaptive") if x["kind"] == "round"]
    norms = [x["update_norm"] for x in records(tmp_path / "adaptive") if x.get("split") == "train" and x["round"] == 1]
    assert rec[0]["dp_clip_norm"] == 5.0 and max(norms) < 5.0 and rec[0]["dp_unclipped"] == 4
    assert rec[1]["dp_clip_norm"] < 5.0 * np.exp(-1.0 * 0.2)  # every update was unclipped: C shrank (noisy count)


def test_cross_site_validation_and_best_model(tmp_path):
    r = launch(tmp_path, "xs", rounds=3)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "xs"
    xs = json.loads((run / "cross_site.json").read_text())["models"]
    assert set(xs) == {"global", "site1", "site2", "site3", "site4"}
    assert all(set(v) == {"site1", "site2", "site3", "site4"} for v in xs.values())
    recs = records(run)
    # the diagonal is each site's locally tuned model of the last round on its own data
    for s in ("site1", "site2", "site3", "site4"):
        loc = [x for x in recs if x["round"] == 3 and x.get("site") == s and x["split"] == "val" and x["model"] == "local"][0]
        assert xs[s][s]["accuracy"] == pytest.approx(loc["accuracy"]) and xs[s][s]["auc"] == pytest.approx(loc["auc"])
        glob = [x for x in recs if x["round"] == 3 and x.get("site") == s and x["split"] == "val" and x["model"] == "global"][0]
        assert xs["global"][s]["accuracy"] == pytest.approx(glob["accuracy"])
        assert 0.5 < glob["auc"] <= 1 and len(glob["recall"]) == 10
    assert "cross-site validation" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best"]
    rounds = {x["round"]: x["val_accuracy"] for x in recs if x["kind"] == "round"}
    assert best["value"] == max(rounds.values()) and rounds[best["round"]] == best["value"]
    with np.load(run / "best.npz") as z:
        meta = json.loads(bytes(z["meta"]).decode())
        assert meta["round"] == best["round"]
        if best["round"] == 3:
            np.testing.assert_array_equal(z[f"model/{next(iter(ckpt(run, 3)['model']))}"],
                                          next(iter(ckpt(run, 3)["model"].values())))


HARD = ["fl.strategy=fedadam", "fl.server.lr=0.3", *PARTICIPATION,
        "privacy.dp={noise_multiplier: 0.5, clip_norm: 1.0, adaptive: true}"]


def test_resume_and_graceful_stop_give_the_uninterrupted_weights(tmp_path):
    """FedAdam state, the plan's RNG, DP noise, adaptive C and the accountant all survive a kill and a stop."""
    rounds = 6
    a = launch(tmp_path, "straight", *HARD, rounds=rounds)
    assert a.returncode == 0, a.stdout + a.stderr
    b = launch(tmp_path, "killed", *HARD, "debug.inject_failure={rank: 0, round: 3, mode: kill}", rounds=rounds)
    assert b.returncode != 0
    b = launch(tmp_path, "killed", *HARD, rounds=rounds)
    assert b.returncode == 0 and "resuming after round 2" in b.stdout, b.stdout + b.stderr

    # graceful: SIGUSR1 to rank 0 (what the sbatch script's trap turns into a stop file, sent directly);
    # the run is held at the start of round 3 until the stop is asked, so it cannot finish first
    gate = tmp_path / "hold-stopped"
    cmd = [sys.executable, "-m", "hpcfl", "launch", *args(tmp_path, "stopped", (*HARD, hold(gate, 3)), rounds)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    t = time.monotonic()
    while not (metrics.exists() and metrics.read_text().count('"kind": "round"') >= 2):
        assert time.monotonic() - t < 120 and p.poll() is None, p.communicate()
        time.sleep(0.05)
    (tmp_path / "stopped" / "stop-requested").touch()
    gate.unlink()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    stopped = summary["stopped_after_round"]
    assert stopped == 3 and f"stopped after round {stopped} on request" in out
    assert (tmp_path / "stopped" / "checkpoints" / f"round-{stopped:06d}.npz").exists()  # the round was not lost
    assert not (tmp_path / "stopped" / "stop-requested").exists()
    c = launch(tmp_path, "stopped", *HARD, rounds=rounds)
    assert c.returncode == 0 and f"resuming after round {stopped}" in c.stdout, c.stderr

    wa = ckpt(tmp_path / "straight", rounds)
    for run in ("killed", "stopped"):
        w = ckpt(tmp_path / run, rounds)
        for k in wa["model"]:
            assert np.array_equal(wa["model"][k], w["model"][k]), (run, k)
        for k in wa["strategy"]:
            assert np.array_equal(wa["strategy"][k], w["strategy"][k]), (run, k)
        assert w["state"]["accountant"] == wa["state"]["accountant"] and w["state"]["clip_norm"] == wa["state"]["clip_norm"]
    eps = lambda run: [(x["round"], x["dp_epsilon"], x["participants"]) for x in records(tmp_path / run)
                       if x["kind"] == "round"]
    assert eps("killed") == eps("straight") == eps("stopped")


def test_sigusr1_to_rank0_stops_after_the_round(tmp_path):
    gate = tmp_path / "hold"
    cmd = [sys.executable, "-m", "hpcfl", "launch", *args(tmp_path, "sig", [hold(gate, 2)], 30)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.monotonic()
    manifest = tmp_path / "sig" / "manifest.json"
    metrics = tmp_path / "sig" / "metrics.jsonl"
    while not (metrics.exists() and '"kind": "round"' in metrics.read_text()):
        assert time.monotonic() - t < 120 and p.poll() is None, p.communicate()
        time.sleep(0.05)
    pid0 = json.loads(manifest.read_text())["ranks"][0]["pid"]
    os.kill(pid0, signal.SIGUSR1)
    gate.unlink()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    summary = json.loads((tmp_path / "sig" / "summary.json").read_text())
    assert summary["stopped_after_round"] == 2 and "stop requested (signal 10)" in \
        (tmp_path / "sig" / "logs" / "rank-0000.log").read_text()
