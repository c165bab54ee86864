"""MPI plumbing: communicators from the topology, and chunked buffer collectives.

Models travel as contiguous float32 NumPy buffers through mpi4py's uppercase
(buffer) methods: no pickling. Large models go in chunks of ``chunk_mb`` so no
single message approaches MPI's 2 GiB count limit, and chunks pipeline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .device import chunks
from .topology import UNDEFINED, Role, comm_colors


@dataclass
class Comms:
    world: Any
    federation: Optional[Any]  # rank 0 + every slot's leader; rank 0 is its root
    site: Optional[Any]  # this slot's ranks (a slot trains its sites in turn); its leader is rank 0
    trainers: Optional[Any]  # every slot rank, rank 0 excluded (Horovod's communicator)


def split_comms(world: Any, role: Role) -> Comms:
    from mpi4py import MPI

    colors = comm_colors(role)
    made = {}
    for name in ("federation", "site", "trainers"):  # every rank calls every Split, in the same order
        c = colors[name]
        made[name] = world.Split(MPI.UNDEFINED if c == UNDEFINED else c, world.Get_rank())
    return Comms(world=world, **{k: (None if v == MPI.COMM_NULL else v) for k, v in made.items()})


def bcast_array(comm: Any, arr: np.ndarray, root: int = 0, chunk_mb: int = 8) -> None:
    for s, e in chunks(arr.size, arr.itemsize, chunk_mb):
        comm.Bcast(arr[s:e], root=root)


def send_array(comm: Any, arr: np.ndarray, dest: int, chunk_mb: int = 8) -> None:
    for s, e in chunks(arr.size, arr.itemsize, chunk_mb):
        comm.Send(arr[s:e], dest=dest)


def recv_array(comm: Any, arr: np.ndarray, source: int, chunk_mb: int = 8) -> None:
    for s, e in chunks(arr.size, arr.itemsize, chunk_mb):
        comm.Recv(arr[s:e], source=source)


def reduce_sum_array(comm: Any, send: Optional[np.ndarray], recv: Optional[np.ndarray], root: int = 0,
                     chunk_mb: int = 8) -> None:
    """Sum ``send`` over ``comm`` into ``recv`` at ``root``. The root contributes ``recv``'s
    own content in place (zero it first), so it never needs a second model-sized buffer."""
    from mpi4py import MPI

    if comm.Get_rank() == root:
        assert recv is not None
        for s, e in chunks(recv.size, recv.itemsize, chunk_mb):
            comm.Reduce(MPI.IN_PLACE, recv[s:e], op=MPI.SUM, root=root)
    else:
        assert send is not None
        for s, e in chunks(send.size, send.itemsize, chunk_mb):
            comm.Reduce(send[s:e], None, op=MPI.SUM, root=root)


def wait_quietly(req: Any, max_sleep: float = 0.001) -> None:
    """Complete a non-blocking MPI request by polling with short sleeps.

    A blocking MPI call busy-polls: a rank waiting for others (rank 0 while the
    sites train, everyone while the others import torch) would take CPU from
    the ranks it waits for whenever they share cores.
    """
    delay = 1e-5
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 2, max_sleep)


def quiet_barrier(comm: Any, wait: bool = True) -> Any:
    """Barrier on ``comm`` that sleeps instead of spinning; with wait=False returns the request
    (a rank that has work to do right after enters the barrier and completes it later)."""
    req = comm.Ibarrier()
    if wait:
        wait_quietly(req)
        return None
    return req
