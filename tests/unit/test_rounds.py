"""Pure pieces of a round: the participation plan, metrics from sums, and the config rules around them."""
import numpy as np
import pytest
from hpcfl import metrics as M
from hpcfl.config import from_dict
from hpcfl.errors import ConfigError, RankFailure
from hpcfl.participation import DISCARDED, DROPOUT, NOT_SAMPLED, RETURNS, STRAGGLER, draw, plan_round, sample_size


def cfg(**fl):
    sites = fl.pop("sites", [{"name": f"s{i}"} for i in range(4)])
    return from_dict({"sites": sites, "fl": fl})


def test_sample_size_follows_fraction_with_a_floor():
    assert sample_size(0.5, 1, 4) == 2
    assert sample_size(0.1, 1, 4) == 1
    assert sample_size(0.1, 3, 4) == 3
    assert sample_size(1.0, 1, 7) == 7


def test_a_plan_is_seeded_and_samples_without_replacement():
    c = cfg(sampling={"fraction": 0.5})
    a = [plan_round(np.random.default_rng(3), c.fl, c.sites, [5] * 4, 1).codes for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    rng = np.random.default_rng(0)
    seen = set()
    for r in range(50):
        codes = plan_round(rng, c.fl, c.sites, [5] * 4, r).codes
        assert (codes == RETURNS).sum() == 2 and (codes == NOT_SAMPLED).sum() == 2
        seen.add(tuple(codes))
    assert len(seen) == 6  # every pair of 4 sites comes up


def test_dropout_and_deadline():
    c = cfg(sites=[{"name": "a", "dropout": 1.0}, {"name": "b", "speed": 0.5}, {"name": "c"}],
            stragglers={"step_time_s": 1.0, "deadline_s": 15})
    p = draw(np.random.default_rng(0), c.fl, c.sites, [10, 10, 10])
    # a always drops; b needs 10 / 0.5 = 20 simulated s > 15; c needs 10
    assert list(p.codes) == [DROPOUT, STRAGGLER, RETURNS]
    assert p.sim_time_s == 15.0  # the server waited for the deadline
    assert list(p.masked) == [True, True, True] and list(p.returns) == [False, False, True]
    assert p.dropped(["a", "b", "c"]) == {"a": "dropout", "b": "straggler"}


def test_too_few_retries_skips_or_fails():
    sites = [{"name": "a", "dropout": 0.5}, {"name": "b", "dropout": 0.5}]
    c = cfg(sites=sites, min_sites=2, on_too_few="retry", max_retries=50)
    p = plan_round(np.random.default_rng(1), c.fl, c.sites, [1, 1], 1)
    assert (p.codes == RETURNS).all() and p.retries > 0  # both return only a quarter of the time
    c = cfg(sites=sites, min_sites=2, on_too_few="skip")
    rng = np.random.default_rng(1)
    p = plan_round(rng, c.fl, c.sites, [1, 1], 1)
    assert not p.aggregate and set(p.codes) <= {DISCARDED, DROPOUT}
    c = cfg(sites=[{"name": "a", "dropout": 1.0}, {"name": "b"}], min_sites=2, on_too_few="fail")
    with pytest.raises(RankFailure, match=r"round 7: only 1 of 2 sites returned, fewer than fl.min_sites = 2 \(a: dropout\)"):
        plan_round(np.random.default_rng(0), c.fl, c.sites, [1, 1], 7)


def test_metric_sums_add_over_shards_and_auc_matches_sklearn():
    from reference_impl import accumulate_metrics
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n, c, bins = 3000, 4, 1000
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    whole = np.zeros(M.vector_size(c, bins))
    accumulate_metrics(whole, p, y, 12.5, bins)
    parts = np.zeros_like(whole)
    for idx in np.array_split(np.arange(n), 3):  # three ranks, summed: the same vector
        v = np.zeros_like(whole)
        accumulate_metrics(v, p[idx], y[idx], 12.5 / 3, bins)
        parts += v
    np.testing.assert_allclose(parts, whole)
    s = M.summarize(whole, c, bins)
    assert s["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert s["loss"] == pytest.approx(12.5 / n)
    recall = [((p.argmax(1) == y) & (y == k)).sum() / (y == k).sum() for k in range(c)]
    np.testing.assert_allclose(s["recall"], recall)
    assert s["balanced_accuracy"] == pytest.approx(np.mean(recall))
    exact = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert abs(s["auc"] - exact) < 1.0 / bins


def test_auc_of_a_perfect_and_a_useless_scorer():
    assert M.binned_auc(np.array([0, 0, 3.0]), np.array([2.0, 0, 0])) == 1.0
    assert M.binned_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert np.isnan(M.binned_auc(np.zeros(3), np.ones(3)))


@pytest.mark.parametrize("fl,privacy,msg", [
    ({"strategy": "median"}, {"secure_aggregation": True}, "privacy.secure_aggregation: median needs each site's update"),
    ({"strategy": "krum"}, {"dp": True}, "privacy.dp: DP-FedAvg's noise calibration"),
    ({"strategy": "krum", "robust": {"byzantine": 1}}, {}, "fl.robust.byzantine: Krum with f=1 needs at least 5 sites"),
    ({"strategy": "trimmed_mean", "robust": {"trim_fraction": 0.49}}, {}, None),
    ({"min_sites": 5}, {}, "fl.min_sites: 5 is more than the 4 sites"),
    ({}, {"exclude_vars": ["(unclosed"]}, "privacy.exclude_vars[0]: '(unclosed' is not a regular expression"),
    ({}, {"dp": {"adaptive": True, "noise_multiplier": 1.0, "count_noise_multiplier": 0.4}},
     "privacy.dp.count_noise_multiplier: must be > noise_multiplier / 2"),
])
def test_combinations_that_cannot_work_are_refused_at_load(fl, privacy, msg):
    raw = {"sites": {"count": 4}, "fl": fl, "privacy": privacy}
    if msg is None:
        from_dict(raw)  # trims 1 of 4 at each end: fine
        return
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        from_dict(raw)


def test_privacy_options_switch_on_with_true_and_site_keys_can_be_set_on_the_shorthand():
    c = from_dict({"sites": {"count": 3}, "privacy": {"dp": True, "secure_aggregation": True}},
                  overrides=["sites.2.dropout=0.3", "fl.strategy=fedadam"])
    assert c.privacy.dp.noise_multiplier == 1.0 and c.privacy.secure_aggregation.frac_bits == 24
    assert [s.dropout for s in c.sites] == [0.0, 0.0, 0.3] and c.sites[2].name == "site3"
    with pytest.raises(ConfigError, match=r"fl.strategy: 'fedadm' is not one of .* \(did you mean 'fedadam'\?\)"):
        from_dict({"sites": {"count": 2}, "fl": {"strategy": "fedadm"}})


def test_rendered_jobs_stop_gracefully_on_the_warning_signal_and_requeue():
    import subprocess

    from hpcfl.cluster.render import render_sbatch

    c = from_dict({"sites": {"count": 2}, "run": {"name": "w"}, "cluster": {"signal_s": 240}})
    text = render_sbatch(c, "cfg.yaml")
    assert "#SBATCH --signal=B:USR1@240" in text
    lines = text.splitlines()
    trap = next(i for i, x in enumerate(lines) if x.startswith("trap ") and "USR1" in x)
    launch = next(i for i, x in enumerate(lines) if x.endswith(" &"))
    assert trap < launch and "touch runs/w/stop-requested" in lines[trap]  # no window without the trap
    assert "scontrol requeue \"$SLURM_JOB_ID\"" in text and "stopped_after_round" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    off = render_sbatch(from_dict({"sites": {"count": 2}, "cluster": {"signal_s": 0, "requeue": False}}), "c.yaml")
    assert "--signal" not in off and " &" not in off and "requeue" not in off.split("set -euo")[1]


def test_evaluated_sites_are_bounded_seeded_and_every_n_rounds():
    from types import SimpleNamespace

    from hpcfl.participation import cross_site_sites, eval_sites

    ev = SimpleNamespace(sites_every=5, sites_max=64, cross_site_max=16)
    assert list(eval_sites(ev, 0, 10, 5, 100)) == list(range(10))  # few sites: all of them
    assert len(eval_sites(ev, 0, 10, 3, 100)) == 0  # between evaluations
    assert len(eval_sites(ev, 0, 10, 7, 7)) == 10  # the last round always
    big = eval_sites(ev, 0, 10_000, 10, 100)
    assert len(big) == 64 and np.all(np.diff(big) > 0) and np.array_equal(big, eval_sites(ev, 0, 10_000, 10, 100))
    assert not np.array_equal(big, eval_sites(ev, 0, 10_000, 15, 100))  # a fresh sample each time
    assert list(cross_site_sites(ev, 0, 16)) == list(range(16))
    cs = cross_site_sites(ev, 0, 128)
    assert len(cs) == 16 and np.array_equal(cs, cross_site_sites(ev, 0, 128))


def test_a_round_of_a_large_federation_records_only_its_cohort_and_names_only_the_dropped():
    import io
    from types import SimpleNamespace

    from hpcfl.protocol.records import EvalRow, Packed, SlotTimes, TrainRow, round_records
    from hpcfl.report import Progress

    k = 500
    names = [f"site{i + 1}" for i in range(k)]
    codes = np.full(k, NOT_SAMPLED)
    codes[[3, 10, 99]] = RETURNS
    codes[42] = DROPOUT
    train = {i: TrainRow(site=i, trained=True, num_train=10, steps=2, train_s=0.1, samples=10) for i in (3, 10, 99)}
    train[42] = TrainRow(site=42, num_train=7)
    evals = {i: EvalRow(i, Packed.of(np.array([1.0, 2.0]))) for i in (3, 42, 400)}
    slots = [SlotTimes(slot=0, train_s=0.3), SlotTimes(slot=1, train_s=0.1)]
    server = dict(send_s=0.0, aggregate_s=0.0, wait_upload_s=0.0, wait_eval_s=0.0)
    recs = round_records(4, names, train, evals, slots, server, codes, lambda v: {"accuracy": v[0] / v[1]},
                         ["accuracy"])
    summary = recs[-1]
    assert summary["dropped"] == {"site43": "dropout"} and summary["not_sampled"] == 496
    assert summary["participants"] == ["site4", "site11", "site100"] and summary["sites_sampled"] == 4
    assert summary["num_train"] == 30 and summary["val_accuracy"] == 0.5
    assert abs(summary["time"]["straggler_s"] - 0.1) < 1e-12  # slowest slot 0.3 - mean 0.2
    assert {r["site"] for r in recs[:-1]} == {"site4", "site11", "site100", "site43", "site401"}
    p = object.__new__(Progress)
    p.cfg, p.out, p.times, p.headline = SimpleNamespace(fl=SimpleNamespace(rounds=10)), io.StringIO(), [], ("accuracy",)
    summary["time"].update(round_s=1.0, overhead_s=0.5)
    p._line(summary)
    line = p.out.getvalue()
    assert "sites 3/4 sampled of 500" in line and "dropped: site43 (dropout)" in line and "not_sampled" not in line


def test_the_aucs_of_all_classes_at_once_are_the_loops_floats():
    rng = np.random.default_rng(3)
    for bins in (16, 256, 1000):
        pos, neg = rng.random((7, bins)) * 50, np.floor(rng.random((7, bins)) * 9)
        pos[2] = 0  # a class without positives: NaN, as binned_auc
        neg[5] = 0
        got = M.binned_aucs(pos, neg)
        want = [M.binned_auc(pos[k], neg[k]) for k in range(7)]
        assert np.isnan(got[2]) and np.isnan(got[5])
        assert [g for i, g in enumerate(got) if i not in (2, 5)] == [w for i, w in enumerate(want) if i not in (2, 5)]
