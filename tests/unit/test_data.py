import numpy as np
import pytest

from hpcfl.config import from_dict
from hpcfl.data import epoch_shard, load_dataset, partition, steps_per_epoch, train_val_split
from hpcfl.errors import ConfigError


def covers_disjointly(parts, n):
    allidx = np.concatenate(parts)
    return len(allidx) == n and len(np.unique(allidx)) == n


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_partition_is_disjoint_covering_and_seeded(how):
    y = np.repeat(np.arange(10), 50)
    parts = partition(y, 4, how, seed=3, alpha=0.3)
    assert covers_disjointly(parts, len(y))
    again = partition(y, 4, how, seed=3, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(y, 4, how, seed=4, alpha=0.3)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_small_alpha_skews_labels():
    y = np.repeat(np.arange(10), 100)
    parts = partition(y, 4, "dirichlet", seed=0, alpha=0.1)
    # With alpha=0.1 most sites are dominated by few classes.
    top_share = [np.bincount(y[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.3
    iid = partition(y, 4, "iid", seed=0)
    assert max(np.bincount(y[p], minlength=10).max() / len(p) for p in iid) < 0.2


def test_train_val_split():
    idx = np.arange(100, 200)
    tr, va = train_val_split(idx, 0.2, seed=0, site_index=1)
    assert len(va) == 20 and covers_disjointly([tr, va], 100) and set(tr) | set(va) == set(idx)


def test_epoch_shards_are_equal_disjoint_and_reshuffled():
    train = np.arange(103)
    shards = [epoch_shard(train, r, 3, seed=0, round_=1, epoch=0, site_index=0) for r in range(3)]
    assert {len(s) for s in shards} == {34}  # the remainder is dropped: equal steps on every rank
    assert len(np.unique(np.concatenate(shards))) == 102
    nxt = epoch_shard(train, 0, 3, seed=0, round_=1, epoch=1, site_index=0)
    assert not np.array_equal(nxt, shards[0])
    assert steps_per_epoch(103, 3, 10) == 4


def test_digits_are_real():
    cfg = from_dict({"sites": [{"name": "a"}]})
    ds = load_dataset(cfg)
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32 and ds.x.max() == 1.0
    assert sorted(np.unique(ds.y)) == list(range(10))
    assert (ds.num_features, ds.num_classes, ds.input_shape) == (64, 10, (1, 8, 8))


def test_too_few_samples():
    with pytest.raises(ConfigError, match="cannot be split"):
        partition(np.zeros(3), 4, "iid", seed=0)


def test_partition_is_lazy_per_site_and_scales_to_ten_thousand_sites():
    y = np.random.default_rng(1).integers(0, 10, 50_000)
    for how in ("iid", "quantity", "dirichlet"):
        p = partition(y, 10_000, how, seed=5, alpha=0.3)
        sizes = p.sizes()
        assert len(p) == 10_000 and sizes.sum() == 50_000 and sizes.min() >= 2, how
        assert all(len(p[i]) == sizes[i] for i in (0, 17, 9_999))
        assert np.array_equal(p[123], partition(y, 10_000, how, seed=5, alpha=0.3)[123])  # seeded, any process
        assert covers_disjointly(list(p), 50_000), how
        # no per-site arrays are kept: the plan is a permutation and cut points
        assert sum(a.nbytes for a in p.perm) + sum(b.nbytes for b in p.bounds) < 50_000 * 8 + 11 * 10_001 * 8
    q = partition(y, 1_000, "quantity", seed=0, alpha=0.3).sizes()
    assert q.max() > 5 * np.median(q)  # quantity skew: a few large sites, many small ones


def test_dirichlet_with_too_many_sites_tops_up_the_smallest():
    y = np.random.default_rng(2).integers(0, 10, 3_000)
    p = partition(y, 1_000, "dirichlet", seed=0, alpha=0.1)  # redraws alone would never give every site 2
    assert p.moved and p.sizes().min() == 2 and covers_disjointly(list(p), 3_000)
