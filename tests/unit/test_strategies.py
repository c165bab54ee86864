import io
import math

import numpy as np
import pytest

from hpcfl.aggregation import fedopt, robust
from hpcfl.aggregation.strategies import (FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Krum, Median, STRATEGIES,
                                          TrimmedMean, make_strategy)

f32 = np.float32


def run_rounds(strategy, w0, deltas):
    w = np.array(w0, f32)
    for r, d in enumerate(deltas, start=1):
        strategy.finalize(np.array(d, f32), w, r)
    return w


# --- server optimizers, hand-computed -----------------------------------------------------------

def test_fedavg_adds_the_mean_update_in_place():
    w = np.array([1, 2, 3], f32)
    buf = w
    FedAvg().finalize(np.array([0.5, -2, 0], f32), w, 1)
    assert buf is w
    np.testing.assert_array_equal(w, [1.5, 0, 3])


def test_fedavgm_two_rounds():
    # server_lr 0.5, beta 0.9, w0 = 0.
    # r1: v = [1, 2, -1];                         w = 0.5*v = [0.5, 1, -0.5]
    # r2: v = 0.9*[1, 2, -1] + [1, 0, 1] = [1.9, 1.8, 0.1]
    #     w = [0.5, 1, -0.5] + 0.5*v = [1.45, 1.9, -0.45]
    s = FedAvgM(server_lr=0.5, momentum=0.9)
    w = run_rounds(s, [0, 0, 0], [[1, 2, -1]])
    np.testing.assert_allclose(w, [0.5, 1, -0.5], rtol=1e-6)
    s.finalize(np.array([1, 0, 1], f32), w, 2)
    np.testing.assert_allclose(w, [1.45, 1.9, -0.45], rtol=1e-6)
    np.testing.assert_allclose(s.state_dict()["momentum"], [1.9, 1.8, 0.1], rtol=1e-6)


# Shared setup for the adaptive rules: lr 1, b1 0.5, b2 0.5, tau 1 (so v starts at tau^2 = 1), m starts at 0,
# w0 = [1, 2, 3], delta1 = [2, -1, 0], delta2 = [0, 1, 2]. delta1^2 = [4, 1, 0], delta2^2 = [0, 1, 4].
W0, D1, D2 = [1, 2, 3], [2, -1, 0], [0, 1, 2]


def test_fedadam_two_steps():
    # m1 = 0.5*0 + 0.5*[2, -1, 0]          = [1, -0.5, 0]
    # v1 = 0.5*1 + 0.5*[4, 1, 0]           = [2.5, 1, 0.5]
    # w1 = w0 + m1/(sqrt(v1)+1)            = [1 + 1/(sqrt(2.5)+1), 2 - 0.5/2, 3 + 0] = [1 + 1/(sqrt 2.5 + 1), 1.75, 3]
    # m2 = 0.5*[1, -0.5, 0] + 0.5*[0, 1, 2] = [0.5, 0.25, 1]
    # v2 = 0.5*[2.5, 1, 0.5] + 0.5*[0, 1, 4] = [1.25, 1, 2.25]
    # w2 = w1 + m2/(sqrt(v2)+1)            = [w1[0] + 0.5/(sqrt(1.25)+1), 1.75 + 0.25/2, 3 + 1/(1.5+1)]
    s = FedAdam(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    w = run_rounds(s, W0, [D1])
    w1_0 = 1 + 1 / (math.sqrt(2.5) + 1)
    np.testing.assert_allclose(w, [w1_0, 1.75, 3], rtol=1e-6)
    s.finalize(np.array(D2, f32), w, 2)
    np.testing.assert_allclose(w, [w1_0 + 0.5 / (math.sqrt(1.25) + 1), 1.875, 3.4], rtol=1e-6)
    st = s.state_dict()
    np.testing.assert_allclose(st["m"], [0.5, 0.25, 1], rtol=1e-6)
    np.testing.assert_allclose(st["v"], [1.25, 1, 2.25], rtol=1e-6)
    assert int(st["step"]) == 2


def test_fedyogi_sign_behaviour():
    # v0 = 1. Yogi: v = v - (1-b2)*d^2*sign(v - d^2)
    # r1: v0 - d1^2 = [1-4, 1-1, 1-0] -> sign [-1, 0, +1]
    #     v1 = [1 + 0.5*4, 1 - 0, 1 - 0.5*0] = [3, 1, 1]
    #     (Adam would give [2.5, 1, 0.5]: Yogi grows additively, and does not decay v where d = 0)
    #     m1 = [1, -0.5, 0]; w1 = [1 + 1/(sqrt(3)+1), 2 - 0.5/2, 3] = [1 + 1/(sqrt 3 + 1), 1.75, 3]
    # r2: v1 - d2^2 = [3-0, 1-1, 1-4] -> sign [+1, 0, -1]
    #     v2 = [3 - 0, 1 - 0, 1 + 0.5*4] = [3, 1, 3]
    #     m2 = [0.5, 0.25, 1]; w2 = w1 + [0.5/(sqrt(3)+1), 0.25/2, 1/(sqrt(3)+1)]
    s = FedYogi(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    w = run_rounds(s, W0, [D1])
    np.testing.assert_allclose(s.state_dict()["v"], [3, 1, 1], rtol=1e-6)
    w1_0 = 1 + 1 / (math.sqrt(3) + 1)
    np.testing.assert_allclose(w, [w1_0, 1.75, 3], rtol=1e-6)
    s.finalize(np.array(D2, f32), w, 2)
    np.testing.assert_allclose(s.state_dict()["v"], [3, 1, 3], rtol=1e-6)
    r3 = 1 / (math.sqrt(3) + 1)
    np.testing.assert_allclose(w, [w1_0 + 0.5 * r3, 1.875, 3 + r3], rtol=1e-6)


def test_fedadagrad_two_steps():
    # b1 = 0 (the FedAdagrad default): m = delta. v = v + d^2, v0 = 1.
    # r1: v1 = [5, 2, 1]; w1 = [1 + 2/(sqrt5+1), 2 - 1/(sqrt2+1), 3]
    # r2: v2 = [5, 3, 5]; w2 = w1 + [0, 1/(sqrt3+1), 2/(sqrt5+1)]
    s = FedAdagrad(server_lr=1.0, beta2=0.5, tau=1.0)
    assert s.beta1 == 0.0
    w = run_rounds(s, W0, [D1])
    w1 = [1 + 2 / (math.sqrt(5) + 1), 2 - 1 / (math.sqrt(2) + 1), 3]
    np.testing.assert_allclose(w, w1, rtol=1e-6)
    s.finalize(np.array(D2, f32), w, 2)
    np.testing.assert_allclose(w, [w1[0], w1[1] + 1 / (math.sqrt(3) + 1), 3 + 2 / (math.sqrt(5) + 1)], rtol=1e-6)
    np.testing.assert_allclose(s.state_dict()["v"], [5, 3, 5], rtol=1e-6)


def test_adaptive_state_starts_at_zero_and_tau_squared():
    s = FedAdam(tau=0.1)
    w = run_rounds(s, np.zeros(4), [np.zeros(4)])
    np.testing.assert_array_equal(w, 0)  # zero pseudo-gradient: m = 0, no move
    np.testing.assert_allclose(s.state_dict()["v"], 0.99 * 0.01, rtol=1e-6)  # v0 = tau^2, decayed once
    assert s.state_dict()["m"].dtype == np.float32 and w.dtype == np.float32


# --- chunking -----------------------------------------------------------------------------------

def _np_reference(variant, w, d_list, lr, b1, b2, tau):
    w = w.astype(np.float64).copy()
    m, v = np.zeros_like(w), np.full_like(w, tau ** 2)
    for d in d_list:
        d = d.astype(np.float64)
        m = b1 * m + (1 - b1) * d
        if variant == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif variant == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        w = w + lr * m / (np.sqrt(v) + tau)
    return w


@pytest.mark.parametrize("variant", ["adam", "yogi", "adagrad"])
def test_chunked_adam_equals_unchunked(monkeypatch, variant):
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=100).astype(f32)
    ds = [rng.normal(size=100).astype(f32) * 0.1 for _ in range(3)]

    def run():
        w, m, v = w0.copy(), np.zeros(100, f32), np.full(100, 1e-3 ** 2, f32)
        for d in ds:
            fedopt.adam_step(w, d, m, v, 1e-2, 0.9, 0.99, 1e-3, variant=variant)
        return w, m, v

    whole = run()
    monkeypatch.setattr(fedopt, "CHUNK", 7)
    assert len(list(fedopt.slices(100))) == 15
    chunked = run()
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(chunked[0], _np_reference(variant, w0, ds, 1e-2, 0.9, 0.99, 1e-3), rtol=1e-5)


def test_chunked_fedavgm_and_add_equal_unchunked(monkeypatch):
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=100).astype(f32)
    ds = [rng.normal(size=100).astype(f32) for _ in range(3)]
    monkeypatch.setattr(fedopt, "CHUNK", 7)
    w = run_rounds(FedAvgM(server_lr=0.7, momentum=0.8), w0, ds)
    ref, v = w0.astype(np.float64), np.zeros(100)
    for d in ds:
        v = 0.8 * v + d
        ref = ref + 0.7 * v
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)
    w = run_rounds(FedAvg(), w0, ds)
    np.testing.assert_allclose(w, w0 + ds[0] + ds[1] + ds[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(run_rounds(FedAvg(), w0, ds[:1]), w0 + ds[0])


def test_slices_cover_exactly(monkeypatch):
    monkeypatch.setattr(fedopt, "CHUNK", 7)
    idx = np.concatenate([np.arange(100)[s] for s in fedopt.slices(100)])
    np.testing.assert_array_equal(idx, np.arange(100))
    assert all(s.stop - s.start <= 7 for s in fedopt.slices(100))
    assert list(fedopt.slices(0)) == []


# --- coordinate rules ---------------------------------------------------------------------------

SITES = np.array([[1, 10, -1],
                  [2, 20, -2],
                  [100, 30, -3],
                  [3, -40, -4],
                  [4, 50, 1000]], f32)


def test_median_hand_computed():
    # K=5: columns sorted (1,2,3,4,100), (-40,10,20,30,50), (-4,-3,-2,-1,1000) -> middle values
    np.testing.assert_array_equal(robust.median(SITES), [3, 20, -2])
    # K=4 (first four rows): (1,2,3,100), (-40,10,20,30), (-4,-3,-2,-1) -> mean of the two middle
    np.testing.assert_array_equal(robust.median(SITES[:4]), [2.5, 15, -2.5])


def test_trimmed_mean_hand_computed():
    # beta 0.25, K=4 -> floor(1.0) = 1 trimmed each end: mean(2,3), mean(10,20), mean(-3,-2)
    np.testing.assert_allclose(robust.trimmed_mean(SITES[:4], 0.25), [2.5, 15, -2.5])
    # beta 0.25, K=5 -> floor(1.25) = 1: mean(2,3,4), mean(10,20,30), mean(-3,-2,-1)
    np.testing.assert_allclose(robust.trimmed_mean(SITES, 0.25), [3, 20, -2])
    # beta 0 is the plain mean: (1+2+100+3+4)/5 = 22
    assert robust.trimmed_mean(SITES, 0.0)[0] == pytest.approx(22)
    assert robust.num_trimmed(100, 0.29) == 29
    with pytest.raises(ValueError, match="trim_fraction"):
        robust.trimmed_mean(SITES, 0.5)
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(0.5)


@pytest.mark.parametrize("strategy,ref", [
    (Median(), robust.median),
    (TrimmedMean(0.2), lambda s: robust.trimmed_mean(s, 0.2)),
])
@pytest.mark.parametrize("num_sites", [5, 6])
def test_coordinate_rules_over_chunks_equal_reference(strategy, ref, num_sites):
    rng = np.random.default_rng(num_sites)
    stack = rng.normal(size=(num_sites, 100)).astype(f32)
    ns = rng.integers(1, 1000, size=num_sites).astype(np.float64)
    agg = np.full(100, np.nan, f32)
    strategy.begin_round(num_sites)
    for start in range(0, 100, 7):
        sl = slice(start, min(start + 7, 100))
        strategy.aggregate_chunk(stack[:, sl], ns, agg[sl])
    np.testing.assert_array_equal(agg, ref(stack))
    # sample counts are ignored (unweighted)
    other = np.empty(100, f32)
    strategy.aggregate_chunk(stack, np.ones(num_sites), other)
    np.testing.assert_array_equal(other, agg)
    w = np.ones(100, f32)
    strategy.finalize(agg, w, 1)
    np.testing.assert_array_equal(w, 1 + ref(stack))


# --- Krum ---------------------------------------------------------------------------------------

# Squared distances: d01=1 d02=4 d03=2 d04=200 d12=5 d13=1 d14=181 d23=2 d24=164 d34=162.
# f=1, K=5 -> each score sums the K-f-2 = 2 nearest others:
#   s0: {1,4,2,200} -> 3;  s1: {1,5,1,181} -> 2;  s2: {4,5,2,164} -> 6;  s3: {2,1,2,162} -> 3
#   s4 (outlier): {200,181,164,162} -> 326
KRUM_SITES = np.array([[0, 0], [1, 0], [0, 2], [1, 1], [10, 10]], f32)


def test_krum_hand_computed():
    np.testing.assert_allclose(robust.krum_scores(KRUM_SITES, 1), [3, 2, 6, 3, 326])
    np.testing.assert_array_equal(robust.multikrum_select(KRUM_SITES, 1, 1), [False, True, False, False, False])
    # m=2: site 1, then the tie s0 = s3 = 3 goes to the lower index
    np.testing.assert_array_equal(robust.multikrum_select(KRUM_SITES, 1, 2), [True, True, False, False, False])
    np.testing.assert_array_equal(robust.multikrum_select(KRUM_SITES, 1, 4), [True, True, True, True, False])


def test_krum_strategy_over_chunks():
    s = make_strategy("krum", {"byzantine": 1, "krum_keep": 2})
    assert s.kind == "select" and (s.byzantine, s.keep) == (1, 2)
    s.begin_round(5)
    s.accumulate_distances(KRUM_SITES[:, :1])
    s.accumulate_distances(KRUM_SITES[:, 1:])
    np.testing.assert_array_equal(s.select(np.array([10.0, 1, 1, 1, 1000])), [True, True, False, False, False])
    np.testing.assert_allclose(s.last_scores, [3, 2, 6, 3, 326])
    s.begin_round(5)  # resets the distances
    np.testing.assert_array_equal(s.distances, 0)


def test_krum_distances_over_chunks_equal_full():
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(7, 100)).astype(f32)
    s = Krum(byzantine=2, keep=3)
    s.begin_round(7)
    for start in range(0, 100, 7):
        s.accumulate_distances(stack[:, start:start + 7])
    full = robust.pairwise_sq_distances(stack)
    np.testing.assert_allclose(s.distances, full, rtol=1e-12)
    np.testing.assert_array_equal(s.select(np.ones(7)), robust.multikrum_select(stack, 2, 3))
    assert s.select(np.ones(7)).sum() == 3


def test_krum_needs_2f_plus_3_sites():
    with pytest.raises(ValueError, match="fl.robust.byzantine"):
        robust.krum_scores(KRUM_SITES[:4], 1)  # 4 < 2*1+3
    with pytest.raises(ValueError, match="fl.robust.byzantine"):
        Krum(byzantine=2).begin_round(6)  # 6 < 7
    Krum(byzantine=2).begin_round(7)
    with pytest.raises(ValueError, match="integer"):
        make_strategy("krum", {"byzantine": 1.5})


# --- state ----------------------------------------------------------------------------------------

def _save_load(state):
    # the way the checkpoint stores it: an npz round trip
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_state_dict_resume_is_bit_identical(name):
    rng = np.random.default_rng(4)
    w0 = rng.normal(size=50).astype(f32)
    ds = [rng.normal(size=50).astype(f32) * 0.1 for _ in range(3)]
    params = {"server_lr": 0.05, "tau": 1e-2}
    straight = run_rounds(make_strategy(name, params), w0, ds)

    first = make_strategy(name, params)
    w = run_rounds(first, w0, ds[:1])
    state = _save_load(first.state_dict())
    resumed = make_strategy(name, params)
    resumed.load_state_dict(state)
    assert resumed.step == 1
    for r, d in enumerate(ds[1:], start=2):
        resumed.finalize(d.copy(), w, r)
    np.testing.assert_array_equal(w, straight)
    assert not np.array_equal(w, run_rounds(make_strategy(name, params), w0, ds[1:]))  # state mattered


def test_fresh_state_is_empty_and_loads():
    s = FedAdam()
    assert s.state_dict() == {}
    s.load_state_dict({})
    run_rounds(s, np.zeros(3), [np.ones(3)])
    assert set(s.state_dict()) == {"step", "m", "v"}
    s.load_state_dict({})  # back to fresh
    assert s.state_dict() == {}
    FedAvg().load_state_dict({})
    Median().load_state_dict({})


def test_load_state_dict_rejects_bad_state():
    good = {"step": np.array(1), "m": np.zeros(4, f32), "v": np.ones(4, f32)}
    FedAdam().load_state_dict(good)
    bad = [
        {"step": np.array(1), "m": np.zeros(4, f32)},                              # missing v
        {**good, "momentum": np.zeros(4, f32)},                                    # unknown key
        {**good, "v": np.ones(5, f32)},                                            # m/v shapes differ
        {**good, "m": np.zeros((2, 2), f32), "v": np.ones((2, 2), f32)},           # not 1-D
        {**good, "step": np.array([1, 2])},                                        # step not a scalar
        {**good, "step": np.array(1.5)},                                           # step not an integer
        {**good, "m": np.zeros(4, np.int32)},                                      # not floating
    ]
    for state in bad:
        with pytest.raises(ValueError):
            FedAdam().load_state_dict(state)
    with pytest.raises(ValueError, match="no state"):
        FedAvg().load_state_dict(good)
    with pytest.raises(ValueError):
        FedAvgM().load_state_dict(good)  # momentum expected
    s = FedAdam()
    s.load_state_dict(good)
    with pytest.raises(ValueError, match="shape"):
        s.finalize(np.zeros(6, f32), np.zeros(6, f32), 2)  # state from a different model size


def test_loaded_state_is_a_copy():
    m = np.zeros(3, f32)
    s = FedAvgM()
    s.load_state_dict({"step": np.array(2), "momentum": m})
    run_rounds(s, np.zeros(3), [np.ones(3)])
    np.testing.assert_array_equal(m, 0)


# --- factory and interface ------------------------------------------------------------------------

def test_make_strategy_names_kinds_and_defaults():
    kinds = {"fedavg": "mean", "fedprox": "mean", "fedavgm": "mean", "fedadam": "mean", "fedyogi": "mean",
             "fedadagrad": "mean", "median": "coordinate", "trimmed_mean": "coordinate", "krum": "select"}
    assert set(kinds) == set(STRATEGIES)
    for name, kind in kinds.items():
        s = make_strategy(name, {})
        assert (s.name, s.kind) == (name, kind)
    assert isinstance(make_strategy("fedprox", {}), FedAvg)
    m = make_strategy("fedavgm", {})
    assert (m.server_lr, m.momentum) == (1.0, 0.9)
    a = make_strategy("fedadam", {})
    assert (a.server_lr, a.beta1, a.beta2, a.tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert make_strategy("fedyogi", {}).beta1 == 0.9
    assert make_strategy("fedadagrad", {}).beta1 == 0.0
    y = make_strategy("fedyogi", {"server_lr": 0.5, "beta1": 0.1, "beta2": 0.2, "tau": 0.3, "trim_fraction": 0.4})
    assert (y.server_lr, y.beta1, y.beta2, y.tau) == (0.5, 0.1, 0.2, 0.3)
    assert make_strategy("fedavgm", {"server_momentum": 0.5, "beta1": 0.1}).momentum == 0.5
    assert make_strategy("trimmed_mean", {"trim_fraction": 0.3}).trim_fraction == 0.3
    with pytest.raises(ValueError, match="unknown aggregation strategy"):
        make_strategy("fedsgd", {})


def test_memory_copies():
    expect = {"fedavg": 0, "fedprox": 0, "fedavgm": 1, "fedadam": 2, "fedyogi": 2, "fedadagrad": 2,
              "median": 0, "trimmed_mean": 0, "krum": 0}
    assert {n: make_strategy(n, {}).memory_copies() for n in STRATEGIES} == expect


def test_wrong_kind_methods_raise():
    with pytest.raises(NotImplementedError):
        FedAdam().aggregate_chunk(np.zeros((2, 3), f32), np.ones(2), np.zeros(3, f32))
    with pytest.raises(NotImplementedError):
        Median().accumulate_distances(np.zeros((2, 3), f32))
    with pytest.raises(NotImplementedError):
        FedAvg().select(np.ones(2))
    with pytest.raises(RuntimeError):
        Krum().select(np.ones(5))
