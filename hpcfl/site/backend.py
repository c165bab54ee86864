"""The interface a slot's ranks train through (:class:`SiteBackend`), the one-rank backend, and the factory
of ``site.backend``."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

from ..tasks.base import SiteGroup

BACKENDS = ("horovod", "torch")


class SiteBackend(SiteGroup):
    """Collective operations among the ranks of one slot (and nobody else).

    A slot of one rank needs no collective at all: backends skip them, and no
    backend library is even started when every slot has one rank.
    """

    name = "base"

    def average_gradients_(self, grad: Any) -> None:
        """Average the flat gradient over the slot's ranks, in place (one allreduce, not one per tensor)."""
        if self.size > 1:
            self.allreduce_sum_(grad)
            grad.div_(self.size)

    @abstractmethod
    def info(self) -> dict:
        """What the manifest records: library, version, transport (e.g. NCCL or Gloo)."""

    def shutdown(self) -> None:
        """Release the backend's resources at the end of the run (most hold none)."""


class SoloBackend(SiteBackend):
    """A slot of one rank: every collective is the identity."""

    name = "solo"

    def __init__(self):
        self.size, self.rank = 1, 0

    def allreduce_sum_(self, tensor: Any) -> None:
        pass

    def allgather(self, tensor: Any) -> Any:
        return tensor

    def broadcast_(self, tensor: Any, root: int = 0) -> None:
        pass

    def info(self) -> dict:
        return {"backend": "none (1-rank slots)"}


def make_backend(name: str, topology, role, trainers_comm, device: Any = None) -> SiteBackend:
    """The backend of ``site.backend`` for this rank's slot. When every slot has one rank, none is started."""
    if all(s.size == 1 for s in topology.slots):
        return SoloBackend()
    if name == "horovod":
        from .horovod import HorovodBackend

        return HorovodBackend(topology, role, trainers_comm, device)
    if name == "torch":
        from .torch_dist import TorchBackend

        return TorchBackend(topology, role, trainers_comm, device)
    raise ValueError(f"unknown site backend {name!r}")
