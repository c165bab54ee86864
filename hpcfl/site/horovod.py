"""Horovod backend: one process set per slot, initialised on the communicator of all slot ranks.

Horovod runs on every slot rank and never on the aggregator (which has nothing
to train), so ``hvd.init(comm=<all slot ranks>, process_sets=[one per slot])``
and Horovod rank = world rank - 1. Gradients are averaged as one flat tensor
(``hvd.allreduce_`` with ``op=Average``, what DistributedOptimizer does per tensor).
On GPUs, Horovod must be built with NCCL (``HOROVOD_GPU_OPERATIONS=NCCL``).
"""
from __future__ import annotations

from typing import Any

from ..errors import require
from . import SiteBackend


class HorovodBackend(SiteBackend):
    name = "horovod"

    def __init__(self, topology, role, trainers_comm, device: Any = None):
        self.hvd = require("horovod.torch", "bash scripts/install.sh (builds Horovod with PyTorch, MPI and Gloo), "
                                            "or set site.backend: torch")
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
        return {"backend": "horovod", "version": getattr(__import__("horovod"), "__version__", "?"),
                "nccl_built": bool(h.nccl_built()), "mpi_built": bool(h.mpi_built()), "gloo_built": bool(h.gloo_built())}

    def shutdown(self) -> None:
        self.hvd.shutdown()
