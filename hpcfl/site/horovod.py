"""Horovod backend: one process set per site, initialised on the trainers' communicator.

Horovod runs on every site rank and never on the aggregator (which has nothing
to train), so ``hvd.init(comm=<all site ranks>, process_sets=[one per site])``
and Horovod rank = world rank - 1. Sites of one rank skip Horovod's collectives
(there is nothing to average), which saves its per-step negotiation latency.
"""
from __future__ import annotations

from typing import Any

from ..errors import require
from . import SiteBackend


class HorovodBackend(SiteBackend):
    name = "horovod"

    def __init__(self, topology, role, trainers_comm):
        self.hvd = require("horovod.torch", "bash scripts/install.sh (builds Horovod with PyTorch, MPI and Gloo)")
        hvd = self.hvd
        sets = [hvd.ProcessSet(list(r)) for r in topology.horovod_process_sets()]
        hvd.init(comm=trainers_comm, process_sets=sets)
        self.process_set = sets[role.site.index]
        self.size = role.site.size
        self.root = role.site.leader - 1  # Horovod rank of the leader
        self._bcast_name = f"hpcfl.bcast.{role.site.name}"
        self._ar_name = f"hpcfl.allreduce.{role.site.name}"

    def broadcast_(self, tensor: Any) -> None:
        if self.size > 1:
            self.hvd.broadcast_(tensor, root_rank=self.root, process_set=self.process_set, name=self._bcast_name)

    def allreduce_sum_(self, tensor: Any) -> None:
        if self.size > 1:
            self.hvd.allreduce_(tensor, op=self.hvd.Sum, process_set=self.process_set, name=self._ar_name)

    def distributed_optimizer(self, optimizer: Any, module: Any) -> Any:
        if self.size == 1:
            return optimizer
        return self.hvd.DistributedOptimizer(
            optimizer, named_parameters=module.named_parameters(), process_set=self.process_set
        )

    def synchronize(self, optimizer: Any) -> None:
        if self.size > 1:
            optimizer.synchronize()

    def step(self, optimizer: Any) -> None:
        if self.size > 1:
            with optimizer.skip_synchronize():
                optimizer.step()
        else:
            optimizer.step()

    def shutdown(self) -> None:
        self.hvd.shutdown()
