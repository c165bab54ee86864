"""Horovod backend: one process set per slot, initialised on the communicator of all slot ranks.

Horovod runs on every slot rank and never on the aggregator (which has nothing
to train), so ``hvd.init(comm=<all slot ranks>, process_sets=[one per slot])``
and Horovod rank = world rank - 1. Gradients are averaged as one flat tensor
(``hvd.allreduce_`` with ``op=Average``, what DistributedOptimizer does per tensor).
On GPUs, Horovod must be built with NCCL (``HOROVOD_GPU_OPERATIONS=NCCL``), and NCCL refuses two
ranks of one process set on one GPU: such a layout is refused before ``hvd.init`` (``site.backend: torch``
serves it with Gloo, :mod:`hpcfl.site.layout`).
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError, require
from .backend import SiteBackend


def refuse_shared_gpus(topology, trainers_comm, device: Any) -> None:
    """Every rank raises the same one line when two ranks of one slot train on one GPU (decided from the GPUs'
    UUIDs, exchanged over MPI: all ranks agree, so none waits for the others in ``hvd.init``)."""
    from ..device import gpu_identity
    from .layout import group_transports, shared_gpu_groups

    ids = trainers_comm.allgather(gpu_identity(device))
    bad = shared_gpu_groups(group_transports(topology.process_sets(), dict(enumerate(ids))))
    if bad and device is not None and getattr(device, "type", "cpu") == "cuda":
        p = bad[0]
        raise ConfigError(f"site.backend: horovod: ranks {', '.join(str(r + 1) for r in p.ranks)} of one slot share "
                          f"GPU {p.shared[0]} (cluster.ranks_per_gpu, or fewer GPUs than site ranks), and Horovod's "
                          "NCCL refuses two ranks of a process set on one GPU; use site.backend: torch")


class HorovodBackend(SiteBackend):
    name = "horovod"

    def __init__(self, topology, role, trainers_comm, device: Any = None):
        self.hvd = require("horovod.torch", "bash scripts/install.sh (builds Horovod with PyTorch, MPI and Gloo), "
                                            "or set site.backend: torch")
        refuse_shared_gpus(topology, trainers_comm, device)
        self.on_gpu = device is not None and getattr(device, "type", "cpu") == "cuda"
        hvd = self.hvd
        groups = topology.process_sets()
        if len(groups) == 1:  # one slot holds every trainer: it is Horovod's global set (registering it twice fails)
            hvd.init(comm=trainers_comm)
            self.process_set = hvd.global_process_set
        else:
            sets = [hvd.ProcessSet(list(r)) for r in groups]
            hvd.init(comm=trainers_comm, process_sets=sets)
            self.process_set = sets[role.slot.index]
        self.size = role.slot.size
        self.rank = role.rank_in_slot
        self.base = role.slot.leader - 1  # Horovod rank of the slot leader
        tag = f"slot{role.slot.index}"
        self._names = {k: f"hpcfl.{k}.{tag}" for k in ("bcast", "allreduce", "grad", "gather")}

    def allreduce_sum_(self, tensor: Any) -> None:
        if self.size > 1:
            self.hvd.allreduce_(tensor, op=self.hvd.Sum, process_set=self.process_set, name=self._names["allreduce"])

    def average_gradients_(self, grad: Any) -> None:
        if self.size > 1:
            self.hvd.allreduce_(grad, op=self.hvd.Average, process_set=self.process_set, name=self._names["grad"])

    def allgather(self, tensor: Any) -> Any:
        if self.size == 1:
            return tensor
        return self.hvd.allgather(tensor, process_set=self.process_set, name=self._names["gather"])

    def broadcast_(self, tensor: Any, root: int = 0) -> None:
        if self.size > 1:
            self.hvd.broadcast_(tensor, root_rank=self.base + root, process_set=self.process_set,
                                name=self._names["bcast"])

    def info(self) -> dict:
        h = self.hvd
        transport = "nccl" if self.on_gpu and h.nccl_built() else ("mpi" if h.mpi_enabled() else "gloo")
        return {"backend": "horovod", "transport": transport, "version": getattr(__import__("horovod"), "__version__", "?"),
                "nccl_built": bool(h.nccl_built()), "mpi_built": bool(h.mpi_built()), "gloo_built": bool(h.gloo_built())}

    def shutdown(self) -> None:
        self.hvd.shutdown()
