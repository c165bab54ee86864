"""Site training: a data-parallel backend behind a small interface.

The round logic (:mod:`hpcfl.federation`) only calls :class:`SiteTrainer`, which
only calls a :class:`SiteBackend`. Horovod is the backend today; a
``torch.distributed`` one implements the same five methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class SiteBackend(ABC):
    """Collective operations inside one site (its ranks, and nobody else)."""

    name = "base"

    @abstractmethod
    def broadcast_(self, tensor: Any) -> None:
        """Overwrite ``tensor`` on every rank of the site with the site leader's."""

    @abstractmethod
    def allreduce_sum_(self, tensor: Any) -> None:
        """Sum ``tensor`` over the site's ranks, in place."""

    @abstractmethod
    def distributed_optimizer(self, optimizer: Any, module: Any) -> Any:
        """Wrap ``optimizer`` so gradients are averaged over the site. Called once per process."""

    @abstractmethod
    def synchronize(self, optimizer: Any) -> None:
        """Wait until this step's gradient averaging has finished (timed as allreduce)."""

    @abstractmethod
    def step(self, optimizer: Any) -> None:
        """Apply the (already synchronised) gradients."""

    def shutdown(self) -> None:
        """Release the backend's resources at the end of the run (most hold none)."""


def make_backend(name: str, topology, role, trainers_comm) -> SiteBackend:
    if name == "horovod":
        from .horovod import HorovodBackend

        return HorovodBackend(topology, role, trainers_comm)
    raise ValueError(f"unknown site backend {name!r}")
