"""MPI plumbing: communicators from the topology, and chunked buffer collectives.

Models travel as contiguous float32 NumPy buffers through mpi4py's uppercase
(buffer) methods: no pickling. Large models go in chunks of ``chunk_mb`` so no
single message approaches MPI's 2 GiB count limit, and chunks pipeline.
"""
from __future__ import annotations

import functools
import os
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


def bcast_chunk(comm: Any, buf: Any, root: int = 0) -> None:
    """One chunk of a model broadcast (every rank of ``comm`` calls it with its chunk), waited for quietly.

    Why not ``Bcast``: a blocking MPI call spins, and the ranks of a model broadcast wait for each other
    (the slots for rank 0 to finish aggregating, rank 0 for the slots to copy each chunk out); on shared
    cores the spinning ranks took the CPU from the ones they waited for. Measured on 2 cores with 3 ranks
    and 38 MB (docs/benchmarks.md section 12.7): ~30 ms instead of ~50, and rank 0's CPU 1 ms instead of up
    to 10. All ranks of one broadcast must use it (a blocking collective never matches a non-blocking one).
    With a CUDA-aware MPI, where slots may hand it GPU memory, every rank keeps the blocking ``Bcast``:
    Open MPI's non-blocking collectives are not documented to take device buffers (and rank 0, which has
    no GPU, decides the same way, from the same library).
    """
    if _cuda_aware():
        comm.Bcast(buf, root=root)
        return
    wait_quietly(comm.Ibcast(buf, root=root))


@functools.lru_cache(maxsize=1)
def _cuda_aware() -> bool:
    from .device import cuda_aware_mpi

    return bool(cuda_aware_mpi())


def bcast_array(comm: Any, arr: np.ndarray, root: int = 0, chunk_mb: int = 8) -> None:
    for s, e in chunks(arr.size, arr.itemsize, chunk_mb):
        bcast_chunk(comm, arr[s:e], root)


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


class SharedModels:
    """Rank 0's global model and every slot leader's sum of weighted updates in ONE MPI shared-memory window
    (``MPI_Win_allocate_shared``), where every federation rank runs on one node (``launch.shared_memory``).

    Why: through the Reduce and the Bcast a model crosses MPI's shared-memory transport in fragments, copied in
    by the sender and out by the receiver, while the other ranks wait; at 10-25M parameters those were most of
    a round's overhead (docs/benchmarks.md 12.7, 12.11). Here a slot writes its sum where rank 0 reads it, and
    rank 0's weights ARE what the slots copy from: one pass each, no MPI fragments. Segment r belongs to
    federation rank r (0: the global model; a leader: its sum). The MPI-3 unified model's idiom orders the
    accesses: ``Sync``, a barrier (waited for quietly, as every long wait here), ``Sync`` (:meth:`publish`).
    """

    def __init__(self, fed: Any, n: int):
        from mpi4py import MPI

        self.fed, self.n = fed, n
        self.win = MPI.Win.Allocate_shared(n * 4, 4, comm=fed)
        self.segs = [np.frombuffer(self.win.Shared_query(r)[0], np.float32, count=n) for r in range(fed.Get_size())]
        self.win.Lock_all(MPI.MODE_NOCHECK)

    @property
    def mine(self) -> np.ndarray:
        return self.segs[self.fed.Get_rank()]

    def publish(self) -> None:
        """Every rank's writes before this point are visible to every rank after it (all ranks call it)."""
        self.win.Sync()
        quiet_barrier(self.fed)
        self.win.Sync()

    def close(self) -> None:
        """Collective: a quiet barrier first, so no rank spins inside ``Free`` while the others finish the run."""
        self.segs = []
        quiet_barrier(self.fed)
        self.win.Unlock_all()
        self.win.Free()


def one_node(comm: Any) -> bool:
    """Whether every rank of ``comm`` runs on this node (collective)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size() == comm.Get_size()
    finally:
        node.Free()


def shm_room(nbytes: int) -> Optional[str]:
    """Why ``nbytes`` of shared memory cannot be had on this node (None: they can): Open MPI backs windows with
    a file in ``osc_sm_backing_directory`` (/dev/shm); a tmpfs too small for it would fail mid-run (SIGBUS)."""
    where = os.environ.get("OMPI_MCA_osc_sm_backing_directory", "/dev/shm")
    try:
        st = os.statvfs(where)
    except OSError as exc:
        return f"{where}: {exc.strerror}"
    free = st.f_bavail * st.f_frsize
    if free < nbytes + (64 << 20):
        return f"{where} has {free >> 20} MiB free, the models need {nbytes >> 20} MiB"
    return None


def wait_quietly(req: Any, max_sleep: float = 0.001, patience: float = 0.01, longest: float = 0.02) -> None:
    """Complete a non-blocking MPI request by polling with short sleeps.

    A blocking MPI call busy-polls: a rank waiting for others (rank 0 while the
    sites train, everyone while the others import torch) would take CPU from
    the ranks it waits for whenever they share cores. The sleeps double up to
    ``max_sleep``, then grow with the wait to ``patience`` of the time waited so
    far (at most ``longest``): a wait of a second or more adds at most ~1% to
    itself, and rank 0 waiting out a round of several seconds polls ~5x less
    than at a fixed 1 ms (its polling took 0.04 cores: section 12.6).
    """
    delay, start = 1e-5, time.monotonic()
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 2, max(max_sleep, min(longest, patience * (time.monotonic() - start))))


def quiet_barrier(comm: Any, wait: bool = True) -> Any:
    """Barrier on ``comm`` that sleeps instead of spinning; with wait=False returns the request
    (a rank that has work to do right after enters the barrier and completes it later)."""
    req = comm.Ibarrier()
    if wait:
        wait_quietly(req)
        return None
    return req


SESSION_ENV = "HPCFL_RANK_SESSION"  # "own" (hpcfl launch sets it): each rank starts its own session


def own_session() -> bool:
    """Move this rank into a session of its own when ``HPCFL_RANK_SESSION=own`` (``hpcfl launch`` sets it, as
    torchrun starts each worker in its own session); True when it did.

    Why: Linux with ``sched_autogroup_enabled`` (the default of most distributions) shares the CPU fairly between
    sessions, not processes. Open MPI starts every local rank in mpirun's session, so on a machine where other
    sessions keep the cores busy, all the ranks of a job together got the CPU share of ONE process, where the
    same number of torchrun workers got one share each (docs/benchmarks.md section 12.6). Without contention
    from other sessions it changes nothing. The rank stays the leader of a process group of its own (mpirun's
    signals reach it by pid as before); it loses no terminal, having none (its output goes through mpirun).
    """
    if os.environ.get(SESSION_ENV) != "own" or os.getsid(0) == os.getpid():
        return False
    try:
        if os.getpgid(0) == os.getpid():  # a group leader (Open MPI makes each rank one) may not call setsid:
            os.setpgid(0, os.getpgid(os.getppid()))  # join mpirun's group for a moment
        os.setsid()
    except OSError:  # another launcher's layout (a parent in another session): keep it
        return False
    return True
