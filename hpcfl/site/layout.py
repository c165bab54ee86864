"""Which transport each slot's group uses, from the GPUs its ranks really hold (a pure function).

NCCL builds one communicator per group and refuses two ranks of one communicator on
the same GPU ("Duplicate GPU detected", NCCL's user guide: one rank per GPU per
communicator). Ranks of *different* communicators may share a GPU. Several
simulated sites sharing one GPU (``cluster.ranks_per_gpu > 1``, or a workstation
with fewer GPUs than site ranks) is the main use of a GPU here, so the transport is
chosen per group from the GPU identities the ranks exchange over MPI:

* every rank of the group on its own GPU (UUIDs all different, on one node or
  several): NCCL;
* two or more ranks of the group on one GPU, or any rank of it on the CPU: Gloo,
  over host copies of the device tensors (``staged``) where the ranks train on GPUs.

Identities are GPU UUIDs, unique across nodes, so "the same GPU" never confuses GPU 0
of one node with GPU 0 of another.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

NCCL, GLOO = "nccl", "gloo"


@dataclass(frozen=True)
class GroupTransport:
    """How one group (a slot's ranks) communicates, and why."""

    ranks: Tuple[int, ...]
    transport: str  # "nccl" or "gloo"
    staged: bool  # Gloo over host copies of GPU tensors (the ranks train on GPUs they share)
    shared: Tuple[str, ...] = ()  # GPUs holding two or more of the group's ranks (why it is not NCCL)

    @property
    def reason(self) -> str:
        if self.transport == NCCL:
            return "every rank has its own GPU"
        if self.shared:
            return f"ranks share GPU {', '.join(self.shared)}"
        return "ranks train on the CPU" if not self.staged else "some ranks train on the CPU"


def group_transport(ranks: Sequence[int], gpus: Mapping[int, Optional[str]]) -> GroupTransport:
    """The transport of one group: ``gpus[rank]`` is the identity (UUID) of the rank's GPU, None on the CPU."""
    ranks = tuple(ranks)
    ids = [gpus[r] for r in ranks]
    on_gpu = [i for i in ids if i is not None]
    shared = tuple(sorted(g for g, n in Counter(on_gpu).items() if n > 1))
    if on_gpu and len(on_gpu) == len(ids) and not shared:
        return GroupTransport(ranks, NCCL, staged=False)
    return GroupTransport(ranks, GLOO, staged=bool(on_gpu), shared=shared)


def group_transports(groups: Sequence[Sequence[int]],
                     gpus: Mapping[int, Optional[str]]) -> Tuple[GroupTransport, ...]:
    """:func:`group_transport` of every group (every rank computes the same answer from the same inputs)."""
    return tuple(group_transport(g, gpus) for g in groups)


def shared_gpu_groups(plans: Sequence[GroupTransport]) -> Tuple[GroupTransport, ...]:
    """The groups two or more of whose ranks share a GPU (what a NCCL-only library cannot serve)."""
    return tuple(p for p in plans if p.shared)


def planned_transports(places: Sequence, group_sizes: Sequence[int]) -> Tuple[GroupTransport, ...]:
    """The transports the slots of a rendered placement (``hpcfl placement``) will use, before any rank starts:
    a place's GPU is named by its node and index (what the UUIDs will tell apart at run time); the slots'
    ranks are consecutive from rank 1, ``group_sizes`` ranks each."""
    gpus = {p.rank - 1: (None if p.gpu is None else f"node{p.node}/gpu{p.gpu}") for p in places if p.rank > 0}
    groups, first = [], 0
    for n in group_sizes:
        groups.append(tuple(range(first, first + n)))
        first += n
    return group_transports(groups, gpus)


__all__ = ["GroupTransport", "group_transport", "group_transports", "shared_gpu_groups", "planned_transports",
           "NCCL", "GLOO"]
