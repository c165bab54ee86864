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
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from ..comm import bcast_array, bcast_chunk, quiet_barrier
from ..participation import DROPOUT, RETURNS, STRAGGLER, Plan
from .message import Message, per_site


@dataclass
class Control(Message):
    """The per-round plan from rank 0: stop flag, whether the round aggregates, the DP clip norm, every site's
    participation code and, with ``launch.assign: balanced``, the slot that trains each sampled site (-1: none)."""

    stop: bool = False
    aggregate: bool = False
    clip: float = 0.0
    codes: np.ndarray = per_site(int)
    slot_of: Optional[np.ndarray] = per_site(int, optional=True)  # balanced: the slot of each site; static: None

    @classmethod
    def make(cls, plan: Optional[Plan], k: int, clip: float, stop: bool,
             slots: Optional[np.ndarray] = None) -> "Control":
        codes = plan.codes if plan is not None else np.zeros(k, np.int64)
        return cls(stop=stop, aggregate=bool(plan.aggregate) if plan else False, clip=clip,
                   codes=np.asarray(codes, np.int64), slot_of=slots)

    @classmethod
    def idle(cls, k: int, balanced: bool) -> "Control":
        """What the slots receive in place of a plan (all zeros): after the last round."""
        return cls.unpack(cls.empty(k, _balanced(balanced)), k, _balanced(balanced))

    def returns(self) -> np.ndarray:
        return self.codes == RETURNS

    def masked(self) -> np.ndarray:
        """Sites sampled into the round (secure aggregation sets up masks between these)."""
        return np.isin(self.codes, (RETURNS, DROPOUT, STRAGGLER))


def _balanced(balanced: bool) -> Tuple[str, ...]:
    return ("slot_of",) if balanced else ()


@dataclass
class Participation(Message):
    """Which sites' updates the aggregate takes (those that returned, minus non-finite ones)."""

    counts: np.ndarray = per_site(bool)


class PlanExchange:
    """Rank 0 -> every slot rank, before a round: tiny, and the slots start training on it."""

    @staticmethod
    def server(fed: Any, ctl: Control) -> Control:
        return Control.bcast((fed,), len(ctl.codes), ctl)

    @staticmethod
    def slot(fed: Optional[Any], slot_comm: Optional[Any], k: int, balanced: bool = False) -> Control:
        return Control.bcast((fed, slot_comm), k, optional=_balanced(balanced))


class ParticipationExchange:
    """Rank 0 -> leaders, after the training reports: which sites' updates the aggregate takes."""

    @staticmethod
    def server(fed: Any, back: np.ndarray) -> np.ndarray:
        Participation.bcast((fed,), len(back), Participation(back))
        return back

    @staticmethod
    def slot(fed: Any, k: int) -> np.ndarray:
        return Participation.bcast((fed,), k).counts


class RowsExchange:
    """Leaders -> rank 0: one report per slot (a Message of named rows, pickled; rows are small)."""

    @staticmethod
    def server(fed: Any, wait: bool = True) -> List[Any]:
        if wait:
            quiet_barrier(fed)  # sleep, do not spin, while the slots work
        return fed.gather(None, root=0)[1:]

    @staticmethod
    def slot(fed: Any, report: Message, wait: bool = True) -> None:
        if wait:
            quiet_barrier(fed)
        fed.gather(report, root=0)


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
            stager.receive(flat, lambda buf: bcast_chunk(fed, buf, 0))
        t1 = time.perf_counter()
        backend.broadcast_(flat)
        return t1 - t, time.perf_counter() - t1


__all__ = ["Control", "Participation", "PlanExchange", "ParticipationExchange", "RowsExchange", "ModelExchange"]
