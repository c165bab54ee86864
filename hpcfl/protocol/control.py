"""Small messages of the round protocol, each with rank 0's half next to the slots' half.

* the round's plan (stop flag, whether it aggregates, the DP clip norm, every
  site's participation code), from rank 0 to every slot rank;
* the final participation after local training (a site whose update held NaN
  or inf is left out under ``fault.nonfinite_update: skip_site``), to the leaders;
* rows: per-site reports gathered from the slot leaders;
* the global model, from rank 0 to the leaders and inside every slot.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence

import numpy as np

from ..comm import bcast_array, quiet_barrier
from ..participation import DROPOUT, RETURNS, STRAGGLER, Plan


class Control:
    """The per-round message from rank 0: stop flag, DP clip norm, every site's participation code and,
    with ``launch.assign: balanced``, the slot that trains each sampled site (-1: none)."""

    def __init__(self, k: int, vec: Optional[np.ndarray] = None, balanced: bool = False):
        self.k = k
        self.vec = np.zeros(3 + k * (2 if balanced else 1)) if vec is None else vec

    @classmethod
    def make(cls, plan: Optional[Plan], k: int, clip: float, stop: bool,
             slots: Optional[np.ndarray] = None) -> "Control":
        c = cls(k, balanced=slots is not None)
        c.vec[0], c.vec[1], c.vec[2] = float(stop), float(plan.aggregate if plan else 0), clip
        if plan is not None:
            c.vec[3:3 + k] = plan.codes
        if slots is not None:
            c.vec[3 + k:] = slots
        return c

    stop = property(lambda self: bool(self.vec[0]))
    aggregate = property(lambda self: bool(self.vec[1]))
    clip = property(lambda self: float(self.vec[2]))
    codes = property(lambda self: self.vec[3:3 + self.k].astype(np.int64))

    @property
    def slot_of(self) -> Optional[np.ndarray]:
        """balanced: the slot of each site this round (-1: not sampled); static: None."""
        return self.vec[3 + self.k:].astype(np.int64) if len(self.vec) > 3 + self.k else None

    def returns(self) -> np.ndarray:
        return self.codes == RETURNS

    def masked(self) -> np.ndarray:
        """Sites sampled into the round (secure aggregation sets up masks between these)."""
        return np.isin(self.codes, (RETURNS, DROPOUT, STRAGGLER))


class PlanExchange:
    """Rank 0 -> every slot rank, before a round: tiny, and the slots start training on it."""

    @staticmethod
    def server(fed: Any, ctl: Control) -> Control:
        fed.Bcast(ctl.vec, root=0)
        return ctl

    @staticmethod
    def slot(fed: Optional[Any], slot_comm: Optional[Any], k: int, balanced: bool = False) -> Control:
        ctl = Control(k, balanced=balanced)
        if fed is not None:  # the leader
            fed.Bcast(ctl.vec, root=0)
        if slot_comm is not None and slot_comm.Get_size() > 1:
            slot_comm.Bcast(ctl.vec, root=0)
        return ctl


class ParticipationExchange:
    """Rank 0 -> leaders, after the training reports: which sites' updates the aggregate takes."""

    @staticmethod
    def server(fed: Any, back: np.ndarray) -> np.ndarray:
        fed.Bcast(back.astype(np.float64), root=0)
        return back

    @staticmethod
    def slot(fed: Any, k: int) -> np.ndarray:
        buf = np.zeros(k)
        fed.Bcast(buf, root=0)
        return buf.astype(bool)


class RowsExchange:
    """Leaders -> rank 0: a list of named rows per slot (pickled; rows are small)."""

    @staticmethod
    def server(fed: Any, wait: bool = True) -> List[Any]:
        if wait:
            quiet_barrier(fed)  # sleep, do not spin, while the slots work
        return fed.gather(None, root=0)[1:]

    @staticmethod
    def slot(fed: Any, rows: Sequence[Any], wait: bool = True) -> None:
        if wait:
            quiet_barrier(fed)
        fed.gather(list(rows), root=0)


class ModelExchange:
    """The global model: rank 0 -> leaders (MPI, chunked; staged to the device), then inside every slot."""

    @staticmethod
    def server(fed: Any, weights: np.ndarray, chunk_mb: int) -> float:
        t = time.perf_counter()
        bcast_array(fed, weights, chunk_mb=chunk_mb)
        return time.perf_counter() - t

    @staticmethod
    def slot(fed: Optional[Any], stager: Any, flat: Any, backend: Any) -> tuple:
        """(seconds receiving from rank 0, seconds broadcasting inside the slot)."""
        t = time.perf_counter()
        if fed is not None:
            stager.receive(flat, lambda buf: fed.Bcast(buf, root=0))
        t1 = time.perf_counter()
        backend.broadcast_(flat)
        return t1 - t, time.perf_counter() - t1


__all__ = ["Control", "PlanExchange", "ParticipationExchange", "RowsExchange", "ModelExchange"]
