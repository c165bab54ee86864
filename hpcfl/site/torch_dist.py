"""torch.distributed backend: one process group per slot, NCCL where the slot's ranks each have their own
GPU, Gloo where they share one or train on the CPU (:mod:`hpcfl.site.layout`).

Started from the MPI world, without torchrun: the ranks of all slots (never
the aggregator) form torch.distributed's default group, whose rank 0 picks a
free TCP port and tells the others through mpi4py. The default group is Gloo,
never bound to a device: it only carries the rendezvous, and a NCCL default group
would build one communicator over every trainer rank at once, which NCCL refuses as
soon as two of them share a GPU. The ranks exchange their GPUs' UUIDs over MPI;
every rank then creates every slot's group with ``new_group`` (all ranks must, in the
same order) with that slot's transport, and uses its own. Gradients are averaged as
one flat tensor (one bucket), which is what Horovod does per tensor: both backends
give the same weights.
"""
from __future__ import annotations

import datetime
import inspect
import os
import socket
from typing import Any, Dict, List, Tuple

from .backend import SiteBackend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def rendezvous(trainers_comm: Any) -> Tuple[str, int]:
    """(address, port) of the store, chosen by the trainers' rank 0 and agreed through MPI.

    All ranks on one host: loopback. Otherwise the leader's address as its host name resolves,
    unless HPCFL_DIST_ADDR names one (a cluster whose host names resolve to an unusable interface)."""
    hosts = trainers_comm.allgather(socket.gethostname())
    if trainers_comm.Get_rank() == 0:
        if os.environ.get("HPCFL_DIST_ADDR"):
            addr = os.environ["HPCFL_DIST_ADDR"]
        elif len(set(hosts)) == 1:
            addr = "127.0.0.1"
        else:
            addr = socket.gethostbyname(socket.gethostname())
        found = (addr, _free_port())
    else:
        found = None
    return trainers_comm.bcast(found, root=0)


class TorchBackend(SiteBackend):
    name = "torch"

    def __init__(self, topology, role, trainers_comm, device: Any = None):
        import torch
        import torch.distributed as dist

        from ..device import gpu_identity
        from .layout import group_transports

        self.torch, self.dist = torch, dist
        ids = trainers_comm.allgather(gpu_identity(device))  # who shares which GPU, as every rank sees it
        plans = group_transports(topology.process_sets(), dict(enumerate(ids)))
        addr, port = rendezvous(trainers_comm)
        world, rank = trainers_comm.Get_size(), trainers_comm.Get_rank()
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", world_size=world, rank=rank,
                                timeout=datetime.timedelta(minutes=30))
        groups: List[Any] = []
        bind = "device_id" in inspect.signature(dist.new_group).parameters  # NCCL starts at once, errors at start-up
        for p in plans:  # every rank creates every group, in the same order, with the group's transport
            kwargs = {"device_id": torch.device(device)} if bind and p.transport == "nccl" and rank in p.ranks else {}
            groups.append(dist.new_group(list(p.ranks), backend=p.transport, **kwargs) if len(p.ranks) > 1 else None)
        self.plan = plans[role.slot.index]
        self.transport = self.plan.transport
        self.group = groups[role.slot.index]
        self.size = role.slot.size
        self.rank = role.rank_in_slot
        self.base = role.slot.leader - 1  # the leader's rank in the default group
        self._host: Dict[Tuple[Any, ...], Any] = {}  # pinned host buffers of staged collectives

    def _staged(self, tensor: Any) -> bool:
        return self.plan.staged and tensor.device.type == "cuda"

    def _on_host(self, tensor: Any) -> Any:
        """A pinned host copy of ``tensor`` (a buffer reused per shape and dtype): Gloo's side of a GPU shared by
        several of the slot's ranks. A blocking device-to-host copy: it waits for the work that wrote the tensor."""
        key = (tuple(tensor.shape), tensor.dtype)
        buf = self._host.get(key)
        if buf is None:
            buf = self._host[key] = self.torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        buf.copy_(tensor)
        return buf

    def allreduce_sum_(self, tensor: Any) -> None:
        if self.size == 1:
            return
        if self._staged(tensor):
            host = self._on_host(tensor)
            self.dist.all_reduce(host, op=self.dist.ReduceOp.SUM, group=self.group)
            tensor.copy_(host)
            return
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group)

    def allgather(self, tensor: Any) -> Any:
        """Concatenation along dim 0; first dims may differ (padded to the longest, then cut)."""
        if self.size == 1:
            return tensor
        if self._staged(tensor):
            return self._gather(tensor.cpu()).to(tensor.device)
        return self._gather(tensor)

    def _gather(self, tensor: Any) -> Any:
        torch = self.torch
        n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        self.dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        pad = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        pad[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(pad) for _ in range(self.size)]
        self.dist.all_gather(parts, pad.contiguous(), group=self.group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    def broadcast_(self, tensor: Any, root: int = 0) -> None:
        if self.size == 1:
            return
        if self._staged(tensor):
            host = self._on_host(tensor)
            self.dist.broadcast(host, src=self.base + root, group=self.group)
            tensor.copy_(host)
            return
        self.dist.broadcast(tensor, src=self.base + root, group=self.group)

    def info(self) -> dict:
        torch = self.torch
        out = {"backend": "torch.distributed", "transport": self.transport, "torch": torch.__version__,
               "why": self.plan.reason, "host_staged": self.plan.staged}
        if self.transport == "nccl":  # pragma: no cover - needs a GPU
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return out

    def shutdown(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
