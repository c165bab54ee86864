"""hpcfl.privacy: partial sharing, percentile privacy, DP-FedAvg, secure aggregation."""
import math

import numpy as np
import pytest

from hpcfl.errors import ConfigError, HpcflError
from hpcfl.model import Entry
from hpcfl.privacy import dp, exclude, percentile, secagg

# ----------------------------------------------------------------------------- exclude

ENTRIES = [
    Entry("features.0.weight", (4, 2), 0, 8),
    Entry("features.0.bias", (4,), 8, 4),
    Entry("bn.running_mean", (4,), 12, 4),
    Entry("classifier.weight", (2, 4), 16, 8),
    Entry("classifier.bias", (2,), 24, 2),
]


def test_exclude_slices_and_names():
    assert exclude.matched_names(ENTRIES, [r"^classifier\."]) == ["classifier.weight", "classifier.bias"]
    assert exclude.exclude_slices(ENTRIES, [r"^classifier\."]) == [(16, 26)]  # adjacent ranges merged
    assert exclude.exclude_slices(ENTRIES, ["bias$", "running"]) == [(8, 16), (24, 26)]
    arr = np.ones(26, dtype=np.float32)
    exclude.zero_slices(arr, exclude.exclude_slices(ENTRIES, ["bias"]))
    assert arr[8:12].sum() == 0 and arr[24:26].sum() == 0 and arr.sum() == 20


def test_exclude_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"privacy\.exclude_vars.*'\[unclosed'"):
        exclude.exclude_slices(ENTRIES, ["[unclosed"])
    with pytest.raises(ConfigError, match=r"privacy\.exclude_vars.*'clasifier'.*features\.0\.weight"):
        exclude.exclude_slices(ENTRIES, ["classifier", "clasifier"])


# ----------------------------------------------------------------------------- percentile

def test_percentile_keeps_top_and_clips():
    d = np.array([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 4.0, -1.0, 0.0, 0.4], dtype=np.float32)
    out = np.empty_like(d)
    n = percentile.percentile_filter(d, 30, gamma=3.0, out=out)
    assert n == 3
    np.testing.assert_array_equal(out, np.array([0, -3, 0, 2, 0, 0, 3, 0, 0, 0], dtype=np.float32))
    assert d[1] == -5.0  # input untouched when out is given
    n = percentile.percentile_filter(d, 100, gamma=10.0)  # in place, everything kept
    assert n == 10 and d[1] == -5.0


def test_percentile_ties_are_kept():
    d = np.array([1, -1, 1, 0.5, 0.1], dtype=np.float32)
    assert percentile.percentile_filter(d, 20, gamma=5.0) == 3  # top 1 requested, 3 tie at |1|
    np.testing.assert_array_equal(d, np.array([1, -1, 1, 0, 0], dtype=np.float32))


def test_percentile_large_random_matches_sort():
    rng = np.random.default_rng(0)
    d = rng.standard_normal(100_001).astype(np.float32)
    ref = d.copy()
    n = percentile.percentile_filter(d, 10, gamma=2.5)
    k = math.ceil(ref.size * 0.10)
    thr = np.sort(np.abs(ref))[-k]
    keep = np.abs(ref) >= thr
    assert n == keep.sum() == k
    np.testing.assert_array_equal(d, np.where(keep, np.clip(ref, -2.5, 2.5), 0))


def test_percentile_errors():
    d = np.ones(4, dtype=np.float32)
    for bad in (0, -1, 101):
        with pytest.raises(ConfigError, match=r"privacy\.percentile\.percent"):
            percentile.percentile_filter(d, bad, 1.0)
    with pytest.raises(ConfigError, match=r"privacy\.percentile\.gamma"):
        percentile.percentile_filter(d, 10, 0)
    with pytest.raises(HpcflError, match="NaN"):
        percentile.percentile_filter(np.array([1, np.nan, 0], dtype=np.float32), 50, 1.0)


# ----------------------------------------------------------------------------- dp

def test_clip_hand_computed():
    v = np.array([3, 4, 0], dtype=np.float32)
    norm, clipped = dp.clip_(v, 1.0)
    assert norm == 5.0 and clipped
    np.testing.assert_allclose(v, [0.6, 0.8, 0.0], rtol=1e-6)
    w = np.array([0.3, 0.4], dtype=np.float32)
    norm, clipped = dp.clip_(w, 1.0)
    assert not clipped and norm == pytest.approx(0.5) and w[0] == np.float32(0.3)
    with pytest.raises(ConfigError, match=r"privacy\.dp\.clip_norm"):
        dp.clip_(w, 0)


def test_norm_is_float64_and_chunked():
    x = np.full(3_000_001, 0.1, dtype=np.float32)
    assert dp.l2_norm(x, chunk=1 << 16) == pytest.approx(math.sqrt(x.size * float(np.float32(0.1)) ** 2), rel=1e-12)


def test_gaussian_noise_std():
    rng = np.random.default_rng(1)
    a = np.full(1_000_000, 2.0, dtype=np.float32)
    dp.gaussian_noise_(a, 0.5, rng, chunk=300_000)  # odd chunking on purpose
    assert a.dtype == np.float32
    assert abs(a.mean() - 2.0) < 0.005  # se = 0.0005
    assert abs(a.std() - 0.5) < 0.005   # se ~ 0.00035
    b = np.zeros(10, dtype=np.float32)
    dp.gaussian_noise_(b, 0.0, rng)
    assert not b.any()


def test_adaptive_clip_update_hand_computed():
    assert dp.adaptive_clip_update(1.0, 0.5, 0.5, 0.2) == 1.0
    assert dp.adaptive_clip_update(2.0, 0.9, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.08))  # shrinks
    assert dp.adaptive_clip_update(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))    # grows
    with pytest.raises(ConfigError, match=r"privacy\.dp\.target_quantile"):
        dp.adaptive_clip_update(1.0, 0.5, 1.5, 0.2)


def test_noisy_unclipped_fraction():
    rng = np.random.default_rng(0)
    assert dp.noisy_unclipped_fraction(3, 4, 0.0, rng) == 0.75
    vals = [dp.noisy_unclipped_fraction(3, 4, 2.0, rng) for _ in range(4000)]
    assert abs(np.mean(vals) - 0.75) < 0.05 and abs(np.std(vals) - 0.5) < 0.05


def test_split_noise():
    z = 1.0
    zd = dp.split_noise(z, 5.0)
    assert zd == pytest.approx((1 - 1 / 100) ** -0.5)
    assert zd > z
    # The two mechanisms together compose back to z: z^-2 = zd^-2 + (2 zb)^-2.
    assert zd ** -2 + (2 * 5.0) ** -2 == pytest.approx(z ** -2)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        dp.split_noise(1.0, 0.5)


@pytest.mark.parametrize("z,q,rounds,delta", [(1.1, 0.01, 1000, 1e-5), (0.8, 0.25, 50, 1e-6), (2.0, 1.0, 100, 1e-5)])
def test_epsilon_matches_dp_accounting(z, q, rounds, delta):
    import dp_accounting

    gauss = dp_accounting.GaussianDpEvent(z)
    event = gauss if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    assert dp.epsilon(z, q, rounds, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_epsilon_monotonic_and_accountant_state():
    eps = [dp.epsilon(1.0, 0.1, r, 1e-5) for r in (0, 1, 10, 100, 1000)]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:]))
    acc = dp.Accountant(1.0, 0.1, 1e-5)
    assert acc.epsilon() == 0.0
    acc.step()
    acc.step(9)
    assert acc.steps == 10 and acc.epsilon() == pytest.approx(eps[2])
    again = dp.Accountant(1.0, 0.1, 1e-5)
    again.load_state_dict(acc.state_dict())
    assert again.steps == 10 and again.epsilon() == acc.epsilon()
    other = dp.Accountant(2.0, 0.1, 1e-5)
    with pytest.raises(ConfigError, match=r"privacy\.dp\.noise_multiplier"):
        other.load_state_dict(acc.state_dict())
    with pytest.raises(ConfigError, match=r"privacy\.dp\.sample_rate"):
        dp.Accountant(1.0, 0.0, 1e-5)


def test_opacus_not_needed():
    import hpcfl.privacy  # noqa: F401
    import sys

    assert "opacus" not in sys.modules


# ----------------------------------------------------------------------------- secagg

def _setup(num_sites, round_=0):
    # Fixed private keys: the statistical tests below are deterministic.
    keys = [secagg.Keypair.from_private_bytes(bytes([i + 1]) * 32) for i in range(num_sites)]
    pubs = [k.public_bytes() for k in keys]
    seeds = [{j: secagg.pair_seed(keys[i], pubs[j], round_, i, j) for j in range(num_sites) if j != i}
             for i in range(num_sites)]
    return keys, pubs, seeds


def test_pair_seeds_agree_and_are_fresh():
    keys = [secagg.Keypair.generate() for _ in range(3)]
    pubs = [k.public_bytes() for k in keys]
    assert all(len(p) == 32 for p in pubs)
    s01 = secagg.pair_seed(keys[0], pubs[1], 7, 0, 1)
    assert s01 == secagg.pair_seed(keys[1], pubs[0], 7, 1, 0)  # both ends, either argument order
    assert len(s01) == 32
    assert s01 != secagg.pair_seed(keys[0], pubs[1], 8, 0, 1)  # new round, new seed
    assert s01 != secagg.pair_seed(keys[0], pubs[2], 7, 0, 2)  # other pair
    assert secagg.pair_seed(keys[0].private_key, pubs[1], 7, 0, 1) == s01
    with pytest.raises(ValueError):
        secagg.pair_seed(keys[0], pubs[0], 7, 0, 0)


def test_mask_chunks_are_deterministic_and_distinct():
    seed = bytes(range(32))
    a = secagg.mask_chunk(seed, 0, 1000)
    assert a.dtype == np.uint64
    np.testing.assert_array_equal(a, secagg.mask_chunk(seed, 0, 1000))
    np.testing.assert_array_equal(a[:10], secagg.mask_chunk(seed, 0, 10))
    assert not np.array_equal(a, secagg.mask_chunk(seed, 1, 1000))
    other = bytes(range(1, 33))
    assert not np.array_equal(a, secagg.mask_chunk(other, 0, 1000))
    tail = seed[:16] + bytes(16)  # the seed's second half matters too
    assert not np.array_equal(a, secagg.mask_chunk(tail, 0, 1000))


def test_encode_decode_round_trip_and_overflow():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 100).astype(np.float32)
    u = secagg.encode(x, 24, chunk=999)
    assert u.dtype == np.uint64
    assert u[x < 0].min() > 2 ** 63  # two's complement
    np.testing.assert_allclose(secagg.decode(u, 24), x, atol=2 ** -24, rtol=0)
    out = np.empty(x.size, dtype=np.float64)
    assert secagg.decode(u, 24, out=out) is out
    assert secagg.decode(secagg.encode(np.array([-1.5, 0, 2.25], np.float32), 4), 4).tolist() == [-1.5, 0, 2.25]
    big = np.array([2.0 ** 37], dtype=np.float32)
    secagg.encode(big, 24, num_sites=2)  # 2^37 * 2^24 * 2 = 2^62: allowed
    with pytest.raises(HpcflError, match="2\\^62"):
        secagg.encode(big, 24, num_sites=3)
    with pytest.raises(HpcflError, match="NaN"):
        secagg.encode(np.array([np.nan], np.float32))
    with pytest.raises(ConfigError, match=r"privacy\.secagg\.frac_bits"):
        secagg.encode(x, 60)


def test_masked_sum_equals_plain_sum():
    rng = np.random.default_rng(0)
    n, sites = 50_000, 4
    xs = [rng.standard_normal(n).astype(np.float32) * s for s in (1, 10, 0.01, 100)]
    _, _, seeds = _setup(sites)
    total = np.zeros(n, dtype=np.uint64)
    for i, x in enumerate(xs):
        up = secagg.encode(x, 24, num_sites=sites)
        secagg.mask_array_(up, i, seeds[i], chunk=7_000)
        total += up  # what MPI_SUM on uint64 does
    got = secagg.decode(total, 24, out=np.empty(n, dtype=np.float64))
    ref = np.sum([x.astype(np.float64) for x in xs], axis=0)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def _uniform_bytes_p(u):
    """Smallest chi-square p-value over the 8 byte positions of uint64 values (uniform over 256)."""
    from scipy.stats import chisquare

    b = u.view(np.uint8).reshape(-1, 8)
    return min(chisquare(np.bincount(b[:, k], minlength=256)).pvalue for k in range(8))


def test_masked_upload_is_indistinguishable_from_uniform():
    rng = np.random.default_rng(3)
    n, sites = 1 << 17, 4
    _, _, seeds = _setup(sites)
    zeros = np.zeros(n, dtype=np.float32)
    large = (rng.standard_normal(n) * 1000).astype(np.float32)
    for x in (zeros, large):
        plain = secagg.encode(x, 24, num_sites=sites)
        assert _uniform_bytes_p(plain) < 1e-10  # negative control: the encoding alone is far from uniform
        masked = secagg.mask_array_(plain.copy(), 1, seeds[1])
        assert _uniform_bytes_p(masked) > 1e-3
        if x is large:
            as_signed = masked.view(np.int64).astype(np.float64)
            assert abs(np.corrcoef(as_signed, x)[0, 1]) < 0.02  # ~7 standard errors
            assert abs(np.corrcoef(plain.view(np.int64).astype(np.float64), x)[0, 1]) > 0.99


def test_dropout_recovery():
    rng = np.random.default_rng(5)
    n, sites, dropped, chunk = 20_000, 4, 2, 6_000
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(sites)]
    _, _, seeds = _setup(sites, round_=3)
    total = np.zeros(n, dtype=np.uint64)
    for i in range(sites):
        if i == dropped:
            continue
        total += secagg.mask_array_(secagg.encode(xs[i], 24, num_sites=sites), i, seeds[i], chunk=chunk)
    survivors = [i for i in range(sites) if i != dropped]
    ref = np.sum([xs[i].astype(np.float64) for i in survivors], axis=0)
    broken = secagg.decode(total, 24, dtype=np.float64)
    assert np.abs(broken - ref).max() > 1e3  # residual masks garble the sum
    pairs = [(i, dropped, seeds[i][dropped]) for i in survivors]
    secagg.unmask_dropped_array_(total, pairs, chunk=chunk)
    np.testing.assert_allclose(secagg.decode(total, 24, dtype=np.float64), ref, atol=1e-6, rtol=0)
