"""The mean kind's fused passes and its shared-memory halves, without MPI (fakes for the window and the comm).

What they must keep: the same float32 operations per entry as the unfused path (add_site, then rank 0's
division and ``weights +=``), so the weights are bit-identical; a site whose update is not finite never
touches the sum; the slots' segments summed in slot order; a clear way out where shared memory cannot be had.
"""
import math

import numpy as np
import pytest

from hpcfl.aggregation.strategies import FedAvg, FedAvgM
from hpcfl.comm import shm_room
from hpcfl.errors import HpcflError
from hpcfl.privacy.dp import update_norm
from hpcfl.protocol import mean as mean_mod
from hpcfl.protocol.kinds import mean_of_sum, plain_mean
from hpcfl.protocol.mean import MeanKind

pytestmark = pytest.mark.unit

N = 3 * (1 << 16) + 1234  # several blocks and a ragged last one


def kind(n=N):
    k = MeanKind(n, 8, 3, [[0, 1, 2]], ["a", "b", "c"])
    k.begin_round(None, 1)
    return k


def vec(seed, n=N, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def test_add_difference_gives_add_sites_sum_bit_for_bit_and_the_norm_to_1e_6():
    g = vec(0)
    locals_ = [vec(1), vec(2), vec(3)]
    weights = [3.0, 7.0, 12.0]
    fused, plain = kind(), kind()
    for i, (loc, w) in enumerate(zip(locals_, weights)):
        norm = fused.add_difference(i, loc, g, w)
        d = loc - g
        plain.add_site(i, d, w)
        assert norm == pytest.approx(update_norm(d), rel=1e-6)
    assert np.array_equal(fused.acc, plain.acc)
    assert not np.array_equal(locals_[0], g)  # nothing was written into the inputs
    assert np.array_equal(locals_[0], vec(1)) and np.array_equal(g, vec(0))


def test_a_non_finite_site_leaves_the_sum_as_it_was():
    g = vec(0)
    bad = vec(5)
    bad[N - 3] = np.nan
    fused, plain = kind(), kind()
    # first site not finite: the next one's contribution IS the sum; a lone bad site uploads zeros
    assert math.isnan(fused.add_difference(0, bad, g, 2.0))
    assert fused._empty
    fused.add_difference(1, vec(1), g, 3.0)
    plain.add_site(1, vec(1) - g, 3.0)
    assert np.array_equal(fused.acc, plain.acc)
    before = fused.acc.copy()
    inf = vec(6)
    inf[7] = np.inf
    assert not math.isfinite(fused.add_difference(2, inf, g, 4.0))
    assert np.array_equal(fused.acc, before)  # a later bad site: not one entry changed


def test_a_float32_overflow_in_the_norm_is_not_taken_for_a_non_finite_update():
    g = np.zeros(N, np.float32)
    big = np.zeros(N, np.float32)
    big[:4] = 3e19  # squares overflow float32, the values do not
    k = kind()
    norm = k.add_difference(0, big, g, 1.0)
    assert math.isfinite(norm) and norm == pytest.approx(6e19, rel=1e-6)
    assert not k._empty


class FakeWindow:
    """hpcfl.comm.SharedModels without MPI: segment 0 is rank 0's, then one per slot leader."""

    def __init__(self, segs):
        self.segs, self.published = segs, 0

    def publish(self):
        self.published += 1


def reference(parts, weights, total):
    """The unfused path: the sum (in slot order), mean_of_sum's division, Strategy.finalize's add."""
    acc = parts[0].copy()
    for p in parts[1:]:
        acc += p
    w = weights.copy()
    mean_of_sum(FedAvg(), acc, np.ones(len(total), bool), np.ones(len(total), bool), np.asarray(total), {})
    FedAvg().finalize(acc, w, 1)
    return w


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_rank_0s_fused_update_from_the_window_is_the_unfused_one(slots):
    parts = [vec(10 + s, scale=50.0) for s in range(slots)]
    weights = vec(9)
    num_train = np.array([40.0, 24.0, 31.0])
    k = kind()
    k.window = FakeWindow([weights] + parts)
    got = weights.copy()
    k.window.segs[0] = got
    k.update(None, FedAvg(), np.ones(3, bool), num_train, np.empty(N, np.float32), got, 1, {})
    assert k.window.published == 1
    assert np.array_equal(got, reference(parts, weights, num_train))


def test_rank_0s_fused_update_over_mpi_is_the_unfused_one(monkeypatch):
    summed = vec(20, scale=80.0)
    monkeypatch.setattr(MeanKind, "receive_sum", lambda self, fed, acc: np.copyto(acc, summed))
    weights, num_train = vec(9), np.array([40.0, 24.0, 0.0])
    back = np.array([True, True, False])
    got = weights.copy()
    kind().update(None, FedAvg(), back, num_train, np.empty(N, np.float32), got, 1, {})
    want = weights.copy()
    acc = summed.copy()
    mean_of_sum(FedAvg(), acc, back, back, num_train, {})
    FedAvg().finalize(acc, want, 1)
    assert np.array_equal(got, want)


def test_a_rule_that_is_more_than_a_mean_keeps_aggregate_then_finalize(monkeypatch):
    assert plain_mean(FedAvg()) and not plain_mean(FedAvgM(server_lr=1.0, momentum=0.9))
    summed = vec(21)
    monkeypatch.setattr(MeanKind, "receive_sum", lambda self, fed, acc: np.copyto(acc, summed))
    back, num_train = np.ones(3, bool), np.array([1.0, 2.0, 3.0])
    a, b = FedAvgM(server_lr=1.0, momentum=0.9), FedAvgM(server_lr=1.0, momentum=0.9)
    got, want = vec(9), vec(9)
    acc = np.empty(N, np.float32)
    kind().update(None, a, back, num_train, acc, got, 1, {})
    ref = summed.copy()
    mean_of_sum(b, ref, back, back, num_train, {})
    b.finalize(ref, want, 1)
    assert np.array_equal(got, want)


def test_no_samples_is_refused_before_the_model_changes(monkeypatch):
    monkeypatch.setattr(MeanKind, "receive_sum", lambda self, fed, acc: pytest.fail("summed anyway"))
    w = vec(1)
    with pytest.raises(ValueError, match="no samples were aggregated"):
        kind().update(None, FedAvg(), np.ones(3, bool), np.zeros(3), np.empty(N, np.float32), w, 1, {})
    assert np.array_equal(w, vec(1))


class FakeFed:
    """A federation communicator of ``size`` ranks on one node, seen from ``rank``."""

    def __init__(self, rank, size, node_size=None):
        self.rank, self.size, self.node = rank, size, node_size or size
        self.sent = []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        self.sent.append(obj)
        return obj if self.rank == root else True

    def Split_type(self, kind):
        fed = self

        class Node:
            def Get_size(self):
                return fed.node

            def Free(self):
                pass

        return Node()


def wanted_kind():
    k = kind(10)
    k.shm_wanted = True
    return k


def test_rank_0_falls_back_to_mpi_with_a_warning_where_dev_shm_is_too_small(monkeypatch, caplog):
    monkeypatch.setattr(mean_mod, "shm_room", lambda nbytes: "/dev/shm has 3 MiB free, the models need 9 MiB")
    monkeypatch.setattr(mean_mod, "SharedModels", lambda *a: pytest.fail("allocated anyway"))
    fed = FakeFed(0, 3)
    assert wanted_kind().share(fed, np.zeros(10, np.float32)) is None
    assert fed.sent == [False]  # every leader hears the same decision
    assert "launch.shared_memory: the models go through MPI messages instead (/dev/shm has 3 MiB free" in caplog.text


def test_a_federation_across_nodes_or_with_shared_memory_off_keeps_mpi(monkeypatch):
    monkeypatch.setattr(mean_mod, "SharedModels", lambda *a: pytest.fail("allocated anyway"))
    fed = FakeFed(0, 3, node_size=2)
    assert wanted_kind().share(fed, np.zeros(10, np.float32)) is None and fed.sent == [False]
    fed = FakeFed(0, mean_mod.SHARED_MAX_SLOTS + 2)  # more slots than rank 0 should sum one after another
    assert wanted_kind().share(fed, np.zeros(10, np.float32)) is None and fed.sent == [False]
    off = kind(10)  # shm_wanted False: launch.shared_memory: false, or secure aggregation
    fed = FakeFed(0, 3)
    assert off.share(fed, np.zeros(10, np.float32)) is None and fed.sent == [False]


def test_rank_0s_weights_move_into_its_segment_and_a_leaders_sum_into_its_own(monkeypatch):
    class Win:
        def __init__(self, fed, n):
            self.segs = [np.zeros(n, np.float32) for _ in range(fed.Get_size())]
            self.mine = self.segs[fed.Get_rank()]

    monkeypatch.setattr(mean_mod, "SharedModels", Win)
    monkeypatch.setattr(mean_mod, "shm_room", lambda nbytes: None)
    w = np.arange(10, dtype=np.float32)
    k0 = wanted_kind()
    moved = k0.share(FakeFed(0, 3), w)
    assert moved is k0.window.segs[0] and np.array_equal(moved, w)
    k1 = wanted_kind()
    assert k1.share(FakeFed(1, 3)) is None and k1.acc is k1.window.segs[1]


def test_an_mpi_without_shared_windows_fails_in_one_line_that_says_what_to_set(monkeypatch):
    def refuse(fed, n):
        raise RuntimeError("MPI_ERR_WIN: invalid window")

    monkeypatch.setattr(mean_mod, "SharedModels", refuse)
    monkeypatch.setattr(mean_mod, "shm_room", lambda nbytes: None)
    with pytest.raises(HpcflError, match=r"launch.shared_memory: MPI could not allocate a shared-memory window .*"
                                         r"MPI_ERR_WIN.*set launch.shared_memory: false"):
        wanted_kind().share(FakeFed(1, 3))


def test_shm_room_reads_the_backing_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("OMPI_MCA_osc_sm_backing_directory", str(tmp_path))
    assert shm_room(1 << 20) is None
    monkeypatch.setenv("OMPI_MCA_osc_sm_backing_directory", str(tmp_path / "absent"))
    assert shm_room(1 << 20).startswith(f"{tmp_path / 'absent'}: ")

    class Small:
        f_bavail, f_frsize = 100, 1 << 20

    monkeypatch.setattr("os.statvfs", lambda p: Small())
    assert shm_room(200 << 20) == f"{tmp_path / 'absent'} has 100 MiB free, the models need 200 MiB"


class _Model:
    def __init__(self, on_cpu):
        import torch

        self.flat = torch.zeros(10)
        self.array = self.flat.numpy() if on_cpu else None  # None: the model lives on a GPU


def _slot(on_cpu):
    """A SlotWorker's window wiring, without MPI or a GPU: the leader after kind.share found one node."""
    import torch

    from hpcfl.site.slot import SlotWorker

    w = SlotWorker.__new__(SlotWorker)
    w.trainer = type("T", (), {"model": _Model(on_cpu), "torch": torch})()
    w.kind = kind(10)
    w.kind.window = FakeWindow([np.arange(10, dtype=np.float32), np.zeros(10, np.float32)])
    w.global_ = w.trainer.model.flat.clone()
    w.global_host = w.global_.numpy() if on_cpu else np.empty(10, np.float32)
    w.global_shared = False
    return w


@pytest.mark.parametrize("on_cpu", [True, False])
def test_a_leader_reads_the_global_model_in_rank_0s_segment_and_keeps_it_after_the_window(on_cpu):
    w = _slot(on_cpu)
    seg0 = w.kind.window.segs[0]
    w._global_in_window()
    assert w.global_host is seg0  # the update is taken against rank 0's weights: no copy of its own to go stale
    assert w.global_shared is on_cpu  # on a GPU the device copy stays the slot's (Stager.from_host fills it)
    if on_cpu:
        assert w.global_.data_ptr() == seg0.ctypes.data
    closed = []
    w.kind.close = lambda: closed.append(True)
    w._close()
    assert closed and not w.global_shared
    seg0[:] = -1  # the window's memory goes with it: what the slot still holds must not be it
    assert w.global_host is not seg0 and np.array_equal(w.global_host, np.arange(10))
    if on_cpu:
        assert np.array_equal(w.global_.numpy(), np.arange(10))
