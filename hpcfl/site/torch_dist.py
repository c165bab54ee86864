"""torch.distributed backend: one process group per slot, NCCL on GPUs and Gloo on CPUs.

Started from the MPI world, without torchrun: the ranks of all slots (never
the aggregator) form torch.distributed's default group, whose rank 0 picks a
free TCP port and tells the others through mpi4py; every rank then creates
every slot's group with ``new_group`` (all ranks must, in the same order) and
uses its own. Gradients are averaged as one flat tensor (one bucket), which
is what Horovod does per tensor: both backends give the same weights.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, List, Tuple

from . import SiteBackend


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

        self.torch, self.dist = torch, dist
        on_gpu = device is not None and torch.device(device).type == "cuda"
        self.transport = "nccl" if on_gpu else "gloo"
        addr, port = rendezvous(trainers_comm)
        world, rank = trainers_comm.Get_size(), trainers_comm.Get_rank()
        kwargs = {}
        if on_gpu:
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(self.transport, init_method=f"tcp://{addr}:{port}", world_size=world, rank=rank,
                                timeout=datetime.timedelta(minutes=30), **kwargs)
        groups: List[Any] = []
        for ranks in topology.process_sets():  # every rank creates every group, in the same order
            groups.append(dist.new_group(list(ranks)) if len(ranks) > 1 else None)
        self.group = groups[role.slot.index]
        self.size = role.slot.size
        self.rank = role.rank_in_slot
        self.base = role.slot.leader - 1  # the leader's rank in the default group

    def allreduce_sum_(self, tensor: Any) -> None:
        if self.size > 1:
            self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group)

    def allgather(self, tensor: Any) -> Any:
        """Concatenation along dim 0; first dims may differ (padded to the longest, then cut)."""
        if self.size == 1:
            return tensor
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
        if self.size > 1:
            self.dist.broadcast(tensor, src=self.base + root, group=self.group)

    def info(self) -> dict:
        torch = self.torch
        out = {"backend": "torch.distributed", "transport": self.transport, "torch": torch.__version__}
        if self.transport == "nccl":  # pragma: no cover - needs a GPU
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return out

    def shutdown(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
