"""Which transport each slot's group uses on any GPU layout, computed by hand; and what the torch backend
really asks torch.distributed for, with a fake CUDA (GPU UUIDs) and recording init_process_group/new_group.

NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected"): no NCCL group, and no
NCCL default group (which spans every trainer rank), may hold two ranks that share a GPU.
"""
import types

import pytest
import torch
import torch.distributed as dist

from hpcfl.config import from_dict
from hpcfl.errors import ConfigError
from hpcfl.site.layout import GLOO, NCCL, group_transport, group_transports
from hpcfl.topology import topology_for


def kinds(groups, gpus):
    return [(p.transport, p.staged, p.shared) for p in group_transports(groups, gpus)]


def test_one_gpu_four_ranks_two_slots_use_gloo_over_host_copies():
    gpus = {r: "GPU-a" for r in range(4)}
    assert kinds([(0, 1), (2, 3)], gpus) == [(GLOO, True, ("GPU-a",))] * 2
    assert kinds([(0, 1, 2, 3)], gpus) == [(GLOO, True, ("GPU-a",))]


def test_eight_gpus_one_rank_each_use_nccl():
    gpus = {r: f"GPU-{r}" for r in range(8)}
    assert kinds([(0, 1), (2, 3), (4, 5), (6, 7)], gpus) == [(NCCL, False, ())] * 4
    assert kinds([tuple(range(8))], gpus) == [(NCCL, False, ())]


def test_eight_gpus_two_ranks_each():
    gpus = {r: f"GPU-{r // 2}" for r in range(16)}  # placement: ranks_per_gpu consecutive ranks per GPU
    # slots of 2 ranks: both ranks of a slot on one GPU
    assert kinds([(2 * i, 2 * i + 1) for i in range(8)], gpus) == [(GLOO, True, (f"GPU-{i}",)) for i in range(8)]
    # slots of 4 ranks: two GPUs, each holding two of the slot's ranks
    assert kinds([(0, 1, 2, 3), (4, 5, 6, 7)], gpus)[1] == (GLOO, True, ("GPU-2", "GPU-3"))
    # the same 16 ranks, slots that take one rank from each GPU: every rank of a slot has its own GPU
    assert kinds([tuple(range(0, 16, 2)), tuple(range(1, 16, 2))], gpus) == [(NCCL, False, ())] * 2


def test_two_slots_on_one_gpu():
    # two 2-rank slots whose four ranks share one GPU: neither can use NCCL
    assert kinds([(0, 1), (2, 3)], {r: "GPU-x" for r in range(4)}) == [(GLOO, True, ("GPU-x",))] * 2
    # two slots on the same two GPUs, one rank of each slot per GPU: different communicators may share a GPU
    assert kinds([(0, 1), (2, 3)], {0: "GPU-x", 1: "GPU-y", 2: "GPU-x", 3: "GPU-y"}) == [(NCCL, False, ())] * 2
    # two 1-rank slots on one GPU: each group is one rank on its own GPU
    assert kinds([(0,), (1,)], {0: "GPU-x", 1: "GPU-x"}) == [(NCCL, False, ())] * 2


def test_two_nodes():
    # a slot across two nodes of two GPUs each: four different GPUs (device index 0 on both nodes is no clash)
    gpus = {0: "GPU-A0", 1: "GPU-A1", 2: "GPU-B0", 3: "GPU-B1"}
    assert kinds([(0, 1, 2, 3)], gpus) == [(NCCL, False, ())]
    assert kinds([(0, 2), (1, 3)], gpus) == [(NCCL, False, ())] * 2
    # one GPU per node, two ranks on each
    gpus = {0: "GPU-A0", 1: "GPU-A0", 2: "GPU-B0", 3: "GPU-B0"}
    assert kinds([(0, 1, 2, 3)], gpus) == [(GLOO, True, ("GPU-A0", "GPU-B0"))]
    assert kinds([(0, 2), (1, 3)], gpus) == [(NCCL, False, ())] * 2


def test_cpu_ranks_use_plain_gloo_and_a_mixed_slot_stages():
    assert kinds([(0, 1)], {0: None, 1: None}) == [(GLOO, False, ())]
    mixed = group_transport((0, 1), {0: "GPU-a", 1: None})
    assert (mixed.transport, mixed.staged, mixed.reason) == (GLOO, True, "some ranks train on the CPU")
    assert group_transport((0, 1), {0: "GPU-a", 1: "GPU-a"}).reason == "ranks share GPU GPU-a"


# -- the torch backend as torch.distributed sees it ------------------------------------------------------------

class FakeComm:
    """The trainers' MPI communicator as one rank sees it: allgather returns every rank's GPU identity."""

    def __init__(self, rank, ids):
        self.rank, self.ids = rank, ids

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.ids)

    def allgather(self, mine):
        if isinstance(mine, str) and mine.startswith("GPU-"):
            assert mine == self.ids[self.rank]  # this rank's own identity, from (fake) CUDA
            return list(self.ids)
        return ["host"] * len(self.ids)  # rendezvous: host names

    def bcast(self, obj, root=0):
        return ("127.0.0.1", 29500)


def start(monkeypatch, sites, world, rank, uuids, device_index=0):
    """A TorchBackend built by trainer ``rank``; returns (backend, calls to init_process_group and new_group)."""
    from hpcfl.site.torch_dist import TorchBackend

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(uuid=uuids[rank][len("GPU-"):]))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend=None, **kw: calls.append(("init", backend, kw.get("device_id"), None)))
    def new_group(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                  group_desc=None, device_id=None):  # torch's signature (device_id: recent torch)
        calls.append(("group", backend, device_id, tuple(ranks)))
        return f"group{tuple(ranks)}"

    monkeypatch.setattr(dist, "new_group", new_group)
    cfg = from_dict({"sites": sites, "site": {"backend": "torch"}})
    topo = topology_for(cfg, world)
    backend = TorchBackend(topo, topo.role(rank + 1), FakeComm(rank, uuids), torch.device("cuda", device_index))
    return backend, calls


def test_one_gpu_shared_by_four_ranks_never_asks_for_nccl(monkeypatch):
    """Fails on a backend that starts the default group as NCCL bound to cuda:0 (one communicator over four ranks
    of one GPU: NCCL's "Duplicate GPU detected")."""
    backend, calls = start(monkeypatch, {"count": 2, "ranks": 2}, 5, 2, ["GPU-a"] * 4)
    assert calls[0] == ("init", "gloo", None, None)  # the default group: Gloo, bound to no device
    assert calls[1:] == [("group", "gloo", None, (0, 1)), ("group", "gloo", None, (2, 3))]
    assert backend.transport == "gloo" and backend.plan.staged
    assert backend.info()["transport"] == "gloo" and backend.info()["why"] == "ranks share GPU GPU-a"


def test_own_gpus_get_nccl_groups_bound_to_the_rank_s_device(monkeypatch):
    uuids = [f"GPU-{i}" for i in range(4)]
    backend, calls = start(monkeypatch, {"count": 2, "ranks": 2}, 5, 3, uuids, device_index=3)
    assert calls[0] == ("init", "gloo", None, None)
    # the rank binds only the group it belongs to; every rank creates every group, in the same order
    assert calls[1:] == [("group", "nccl", None, (0, 1)), ("group", "nccl", torch.device("cuda", 3), (2, 3))]
    assert backend.transport == "nccl" and not backend.plan.staged and backend.group == "group(2, 3)"


def test_two_slots_sharing_two_gpus_each_get_nccl_and_a_shared_slot_gloo(monkeypatch):
    # 3 slots of 2: slots 0 and 1 use GPUs x, y (one rank of each per GPU), slot 2 has both ranks on z
    uuids = ["GPU-x", "GPU-y", "GPU-x", "GPU-y", "GPU-z", "GPU-z"]
    _, calls = start(monkeypatch, {"count": 3, "ranks": 2}, 7, 4, uuids)
    assert [(c[1], c[3]) for c in calls[1:]] == [("nccl", (0, 1)), ("nccl", (2, 3)), ("gloo", (4, 5))]
    assert all(c[2] is None for c in calls)  # rank 4 belongs to the Gloo slot: nothing bound


def test_a_shared_gpu_slot_reduces_host_copies_with_gloo(monkeypatch):
    backend, _ = start(monkeypatch, {"count": 1, "ranks": 2}, 3, 0, ["GPU-a"] * 2)
    assert backend._staged(types.SimpleNamespace(device=torch.device("cuda", 0)))
    assert not backend._staged(torch.zeros(1))  # a CPU tensor (e.g. a CPU rank of a mixed slot) goes as it is
    seen = []

    def all_reduce(t, op=None, group=None):
        seen.append((t.data_ptr(), group))
        t.mul_(2)  # what the other rank's equal contribution would add

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(backend, "_staged", lambda t: True)  # this CPU tensor stands for the GPU's
    monkeypatch.setattr(backend, "torch", types.SimpleNamespace(
        empty=lambda shape, dtype=None, pin_memory=False: torch.empty(shape, dtype=dtype)))
    grad = torch.tensor([1.0, 2.0])
    backend.allreduce_sum_(grad)
    assert len(seen) == 1 and seen[0][0] != grad.data_ptr() and seen[0][1] == "group(0, 1)"  # a host copy went
    assert grad.tolist() == [2.0, 4.0]  # and came back


def test_horovod_with_ranks_sharing_a_gpu_is_refused_at_validate_time():
    base = {"sites": {"count": 2, "ranks": 2}, "cluster": {"ranks_per_gpu": 4}}
    with pytest.raises(ConfigError, match=r"^<dict>: cluster.ranks_per_gpu: 4 puts ranks of one site on one GPU, "
                                          r"and Horovod's NCCL refuses .*use site.backend: torch") as e:
        from_dict(base)
    assert "\n" not in str(e.value)
    from_dict({**base, "site": {"backend": "torch"}})  # Gloo for such sites
    from_dict({**base, "train": {"device": "cpu"}})
    from_dict({**base, "sites": {"count": 4, "ranks": 1}})  # one-rank sites: no process set to share


def test_horovod_refuses_a_slot_whose_ranks_share_a_gpu_at_start(monkeypatch):
    """What validate cannot see (a workstation with fewer GPUs than site ranks): every rank raises the same line."""
    from hpcfl.site.horovod import refuse_shared_gpus

    topo = topology_for(from_dict({"sites": {"count": 1, "ranks": 2}}), 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="a"))
    with pytest.raises(ConfigError, match=r"^site.backend: horovod: ranks 1, 2 of one slot share GPU GPU-a "):
        refuse_shared_gpus(topo, FakeComm(0, ["GPU-a", "GPU-a"]), torch.device("cuda", 0))
    refuse_shared_gpus(topo, FakeComm(0, ["GPU-a", "GPU-b"]), torch.device("cuda", 0))  # own GPUs: fine
