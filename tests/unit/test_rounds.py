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
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n, c, bins = 3000, 4, 1000
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    whole = np.zeros(M.vector_size(c, bins))
    M.accumulate(whole, p, y, 12.5, bins)
    parts = np.zeros_like(whole)
    for idx in np.array_split(np.arange(n), 3):  # three ranks, summed: the same vector
        v = np.zeros_like(whole)
        M.accumulate(v, p[idx], y[idx], 12.5 / 3, bins)
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
