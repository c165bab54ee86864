import numpy as np
import pytest

from hpcfl.aggregation import FedAvg, make_strategy
from hpcfl.aggregation.fedavg import contribution, fedavg, finalize


def test_fedavg_hand_computed():
    # Site A: 100 samples, weights [1, 2, 3]; site B: 300 samples, weights [5, 6, -1].
    # (100*[1,2,3] + 300*[5,6,-1]) / 400 = [1600, 2000, 0] / 400 = [4, 5, 0]
    a = np.array([1, 2, 3], np.float32)
    b = np.array([5, 6, -1], np.float32)
    np.testing.assert_array_equal(fedavg([a, b], [100, 300]), [4, 5, 0])


def test_split_into_contribution_and_finalize_matches():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=1000).astype(np.float32) for _ in range(4)]
    ns = [10, 250, 3, 77]
    summed = sum(contribution(w, n) for w, n in zip(ws, ns))
    ref = sum(np.float64(n) * w.astype(np.float64) for w, n in zip(ws, ns)) / sum(ns)
    np.testing.assert_allclose(finalize(summed, sum(ns)), ref, rtol=1e-5, atol=1e-6)


def test_equal_weights_is_the_mean():
    a, b = np.array([0.0, 2.0], np.float32), np.array([2.0, 4.0], np.float32)
    np.testing.assert_array_equal(fedavg([a, b], [7, 7]), [1.0, 3.0])


def test_strategy_adds_the_mean_update_in_place():
    s = make_strategy("fedavg")
    assert isinstance(s, FedAvg) and s.kind == "mean"
    g = np.array([1, 1], np.float32)
    # sites' updates (w_s - g) weighted by 3 and 1 samples: the transport sums and divides
    acc = contribution(np.array([0, 0], np.float32), 3) + contribution(np.array([2, 4], np.float32), 1)
    s.finalize(finalize(acc, 4), g, 1)
    np.testing.assert_array_equal(g, [1.5, 2.0])
    assert s.state_dict() == {}


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        finalize(np.zeros(3, np.float32), 0)
    with pytest.raises(ValueError):
        fedavg([np.zeros(2)], [1, 2])
