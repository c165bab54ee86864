"""Small messages of the round protocol, each with rank 0's half next to the slots' half.

* the round's plan (stop flag, whether it aggregates, the DP clip norm, every
  site's participation code), from rank 0 to every slot rank;
* the final participation after local training (a site whose update held NaN
  or inf is left out under ``fault.nonfinite_update: skip_site``), to the leaders;
* rows: per-site reports gathered from the slot leaders;
* the global model, from rank 0 to the leaders and inside every slot.

The plan frames the rounds (both loops call :class:`PlanExchange` themselves); the others are the
transports of the registered per-round exchanges (:mod:`hpcfl.protocol.rounds`), and the global model's
also of start-up.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..comm import bcast_array, bcast_chunk, quiet_barrier
from ..errors import RankFailure
from ..participation import DROPOUT, RETURNS, STRAGGLER, Plan
from .message import Message, per_site

log = logging.getLogger("hpcfl")


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


class Exchange:
    """Base of an exchange run from a registry (:data:`hpcfl.protocol.startup.STARTUP`,
    :data:`hpcfl.protocol.rounds.ROUND`): ``server`` and ``slot`` are its two halves, each reading and filling
    in one context; ``wanted(cfg)`` says whether a launch runs it at all (both sides read the same config)."""

    @staticmethod
    def wanted(cfg: Any) -> bool:
        return True

    @staticmethod
    def server(s: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def slot(s: Any) -> None:
        raise NotImplementedError


def final_participation(r: int, ctl: Control, train: Dict[int, Any], names: Sequence[str],
                        nonfinite: str) -> np.ndarray:
    """Which sites' updates the aggregate takes: those that returned, minus non-finite ones (``nonfinite``:
    ``fault.nonfinite_update``; ``fail`` raises instead)."""
    back = ctl.returns().copy()
    bad = [i for i in np.flatnonzero(back) if not train[i].finite]
    if bad:
        which = ", ".join(repr(names[i]) for i in bad)
        if nonfinite == "fail":
            raise RankFailure(f"round {r}: site(s) {which} uploaded an update with NaN or inf (their local "
                              "training diverged); lower train.lr, or set fault.nonfinite_update: skip_site "
                              "to leave such sites out of a round")
        log.warning("round %d: leaving out site(s) %s: their update holds NaN or inf", r, which)
        back[bad] = False
    return back


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
    def server(fed: Any, weights: np.ndarray, chunk_mb: int, window: Any = None) -> float:
        """``window`` (shared memory: the weights live in it): the leaders copy them from there."""
        t = time.perf_counter()
        if window is not None:
            window.publish()
        else:
            bcast_array(fed, weights, chunk_mb=chunk_mb)
        return time.perf_counter() - t

    @staticmethod
    def slot(fed: Optional[Any], stager: Any, flat: Any, backend: Any, window: Any = None) -> tuple:
        """(seconds receiving from rank 0, seconds broadcasting inside the slot)."""
        t = time.perf_counter()
        if fed is not None and window is not None:
            window.publish()
            stager.from_host(window.segs[0], flat)
        elif fed is not None:
            stager.receive(flat, lambda buf: bcast_chunk(fed, buf, 0))
        t1 = time.perf_counter()
        backend.broadcast_(flat)
        return t1 - t, time.perf_counter() - t1


__all__ = ["Control", "Exchange", "Participation", "final_participation", "PlanExchange", "ParticipationExchange", "RowsExchange", "ModelExchange"]
