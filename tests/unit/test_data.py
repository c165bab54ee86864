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
