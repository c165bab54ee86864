"""The per-round exchanges: each a class with rank 0's half (``server``) next to the slots' half (``slot``),
listed in :data:`ROUND` and run by both loops at the point of the round it names (``at``).

The points of round r, in the order both loops reach them (at each point, the exchanges of that point
run in the order of :data:`ROUND`, on both sides):

* :data:`BEFORE_TRAINING`: both sides hold w[r-1] and round r's plan (``s.ctl``); no site has trained.
* :data:`AFTER_TRAINING`: the slots trained their returning sites (slot: ``s.rows``). Built in:
  :class:`TrainReports` (every leader's TrainReport to rank 0, then the sites whose updates count:
  ``s.train`` at rank 0, ``s.back`` on both sides). Then the aggregation kind's upload and rank 0's
  aggregate and strategy (not an exchange: :mod:`hpcfl.protocol.kinds`).
* :data:`AFTER_AGGREGATION`: rank 0 holds w[r] (``s.model.weights``). Built in: :class:`GlobalModel`
  (w[r] to every slot rank); an exchange listed after it finds the slots holding w[r] too.
* :data:`AFTER_EVALUATION`: the slots evaluated w[r] (slot: ``s.evals``, ``s.central``). Built in:
  :class:`EvalReports` (``s.evals``, ``s.slot_times``, ``s.central`` at rank 0). Then rank 0 sends round
  r+1's plan, adds ``s.record`` to round r's summary in ``metrics.jsonl``, and checkpoints.
* :data:`END_OF_RUN`: after the last round (not after a stop). Built in: :class:`CrossSiteExchange`.

The plan itself (:class:`hpcfl.protocol.control.PlanExchange`) is not one of these: it frames the
rounds. It goes out once before round 1 and then at the end of each round for the next (so the slots
train round r+1 while rank 0 logs and checkpoints round r), it says when the loops stop, and rank 0's
random stream is marked for a resume just before it is drawn.

A new per-round exchange is one class, anywhere (a module of hpcfl, or the program every rank runs)::

    @dataclass
    class Trained(Message):  # what it says: named, typed fields
        slot: int = 0
        sites: int = 0

    class TrainedExchange(RoundExchange):
        at = AFTER_EVALUATION

        @staticmethod
        def server(s: ServerRound) -> None:
            s.record["trained"] = [m.sites for m in s.fed.gather(None, root=0)[1:]]  # into the round's summary

        @staticmethod
        def slot(s: SlotRound) -> None:
            s.fed.gather(Trained(s.slot, sum(row.trained for row in s.rows)), root=0)

    ROUND.append(TrainedExchange)

Neither loop changes. A slot half runs on each slot's leader (``s.fed``: the federation communicator),
or on every slot rank when ``every_slot_rank`` is set (``s.fed`` is then None on the others; ``s.slot_comm``
reaches them); ``wanted(cfg)`` says whether a launch runs it at all (both sides read the same config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..participation import NOT_SAMPLED, eval_sites
from .control import Control, Exchange, ModelExchange, ParticipationExchange, RowsExchange, final_participation
from .records import EvalReport, SlotTimes, TrainReport, by_site

BEFORE_TRAINING = "before training"
AFTER_TRAINING = "after training"
AFTER_AGGREGATION = "after aggregation"
AFTER_EVALUATION = "after evaluation"
END_OF_RUN = "end of run"
POINTS = (BEFORE_TRAINING, AFTER_TRAINING, AFTER_AGGREGATION, AFTER_EVALUATION, END_OF_RUN)


def _quiet(what: str, r: int) -> None:
    pass


@dataclass
class ServerRound:
    """What rank 0's halves of round ``r`` read (the first eight) and fill in."""

    fed: Any  # the federation communicator (rank 0 and the slot leaders)
    cfg: Any
    r: int
    ctl: Control  # round r's plan
    names: List[str]  # every site's name, by index
    model: Any  # hpcfl.protocol.state.GlobalModel: weights (w[r-1], then w[r]) and its scratch buffer acc
    task: Any
    rundir: Any  # hpcfl.rundir.RunDir
    beat: Callable[[str, int], None] = _quiet  # the heartbeat's phase
    train: Dict[int, Any] = field(default_factory=dict)  # site -> its TrainRow (the sampled sites)
    back: Optional[np.ndarray] = None  # (K,) bool: the sites whose updates the aggregate takes
    evals: Dict[int, Any] = field(default_factory=dict)  # site -> its EvalRow (the evaluated sites)
    slot_times: List[SlotTimes] = field(default_factory=list)  # one per slot, in slot order
    central: List[Any] = field(default_factory=list)  # eval.central_fraction: each slot's sums
    record: Dict[str, Any] = field(default_factory=dict)  # added to round r's summary (metrics.jsonl)
    extra: Dict[str, Any] = field(default_factory=dict)  # what an exchange keeps between points of the round

    @property
    def k(self) -> int:
        return len(self.names)


@dataclass
class SlotRound:
    """What a slot rank's halves of round ``r`` read (the first ten) and fill in."""

    fed: Optional[Any]  # the federation communicator on the slot's leader, else None
    slot_comm: Optional[Any]  # the slot's ranks
    cfg: Any
    r: int
    ctl: Control  # round r's plan
    slot: int  # the slot's index
    k: int  # sites in the federation
    flat: Any  # the slot's model (a flat device tensor)
    stager: Any  # hpcfl.device.Stager: host <-> device for MPI
    backend: Any  # the slot's site backend (broadcast inside the slot)
    beat: Callable[[str, int], None] = _quiet  # the heartbeat's phase
    times: Optional[SlotTimes] = None
    rows: List[Any] = field(default_factory=list)  # TrainRows of this slot's sampled sites
    back: Optional[np.ndarray] = None  # (K,) bool, on the leaders: the sites whose updates count
    evals: List[Any] = field(default_factory=list)  # EvalRows of the global model on this slot's sites
    central: Any = None  # eval.central_fraction: this slot's sums
    cross_site: Optional[Callable[[], Any]] = None  # what the slot lends cross-site evaluation (CrossSiteSlot)
    window: Any = None  # the leader's hpcfl.comm.SharedModels (launch.shared_memory), else None
    extra: Dict[str, Any] = field(default_factory=dict)  # what an exchange keeps between points of the round


class RoundExchange(Exchange):
    """Base of a per-round exchange (see the module docstring): ``server(s: ServerRound)``,
    ``slot(s: SlotRound)``, ``wanted(cfg)``."""

    at: str = BEFORE_TRAINING  # the point of the round both sides run it at (POINTS)
    every_slot_rank = False  # the slot half on every slot rank, not only on the leaders
    phase: Optional[str] = None  # the heartbeat phase while it runs (hpcfl.watchdog reads it)


class TrainReports(RoundExchange):
    """Leaders -> rank 0: a TrainRow per sampled site; rank 0 -> leaders: the sites whose updates count (those
    that returned, minus those whose update is not finite)."""

    at = AFTER_TRAINING

    @staticmethod
    def server(s: ServerRound) -> None:
        sampled = np.flatnonzero(s.ctl.codes != NOT_SAMPLED)
        s.train = by_site([m.rows for m in RowsExchange.server(s.fed)], s.k, sampled)
        back = final_participation(s.r, s.ctl, s.train, s.names, s.cfg.fault.nonfinite_update)
        s.back = ParticipationExchange.server(s.fed, back)

    @staticmethod
    def slot(s: SlotRound) -> None:
        RowsExchange.slot(s.fed, TrainReport(s.rows))
        s.back = ParticipationExchange.slot(s.fed, s.k)


class GlobalModel(RoundExchange):
    """Rank 0 -> leaders -> every slot rank: the new global model w[r] (the slot's times record how long)."""

    at = AFTER_AGGREGATION
    every_slot_rank = True

    @staticmethod
    def server(s: ServerRound) -> None:
        ModelExchange.server(s.fed, s.model.weights, s.cfg.launch.chunk_mb, s.model.window)

    @staticmethod
    def slot(s: SlotRound) -> None:
        s.times.recv_s, s.times.site_bcast_s = ModelExchange.slot(s.fed, s.stager, s.flat, s.backend, s.window)


class EvalReports(RoundExchange):
    """Leaders -> rank 0: the slot's times, an EvalRow per evaluated site, the held-out set's sums."""

    at = AFTER_EVALUATION

    @staticmethod
    def server(s: ServerRound) -> None:
        cfg = s.cfg
        gathered = RowsExchange.server(s.fed)
        s.evals = by_site([m.rows for m in gathered], s.k, eval_sites(cfg.eval, cfg.run.seed, s.k, s.r, cfg.fl.rounds))
        s.slot_times = [m.times for m in gathered]
        s.central = [m.central for m in gathered]

    @staticmethod
    def slot(s: SlotRound) -> None:
        RowsExchange.slot(s.fed, EvalReport(s.times, s.evals, s.central))


class CrossSiteExchange(RoundExchange):
    """eval.cross_site: every site's final local model and the global one on every site's validation data
    (:mod:`hpcfl.protocol.crosssite`)."""

    at = END_OF_RUN
    every_slot_rank = True
    phase = "cross-site evaluation"

    @staticmethod
    def wanted(cfg: Any) -> bool:
        return bool(cfg.eval.cross_site)

    @staticmethod
    def server(s: ServerRound) -> None:
        from .crosssite import CrossSite

        CrossSite.server(s.fed, s.cfg, s.names, s.model.weights, s.model.acc, s.task, s.rundir)

    @staticmethod
    def slot(s: SlotRound) -> None:
        from .crosssite import CrossSite

        CrossSite.slot(s.cfg, s.cross_site())


# The per-round exchanges, in the order both sides run those of one point; a new one is appended.
ROUND: List[type] = [TrainReports, GlobalModel, EvalReports, CrossSiteExchange]


def _due(at: str, cfg: Any) -> List[type]:
    unknown = sorted({x.__name__ for x in ROUND if x.at not in POINTS})
    if unknown:
        raise ValueError(f"per-round exchange(s) {', '.join(unknown)}: ``at`` must be one of {', '.join(POINTS)}")
    return [x for x in ROUND if x.at == at and x.wanted(cfg)]


def run_server(at: str, s: ServerRound) -> ServerRound:
    """Rank 0's halves of the exchanges of point ``at``, in the order of :data:`ROUND`."""
    for exchange in _due(at, s.cfg):
        if exchange.phase:
            s.beat(exchange.phase, s.r)
        exchange.server(s)
    return s


def run_slot(at: str, s: SlotRound) -> SlotRound:
    """This slot rank's halves of the exchanges of point ``at`` (leaders: all; other slot ranks: those
    with ``every_slot_rank``), in the order of :data:`ROUND`."""
    for exchange in _due(at, s.cfg):
        if s.fed is None and not exchange.every_slot_rank:
            continue
        if exchange.phase:
            s.beat(exchange.phase, s.r)
        exchange.slot(s)
    return s


__all__ = ["AFTER_AGGREGATION", "AFTER_EVALUATION", "AFTER_TRAINING", "BEFORE_TRAINING", "END_OF_RUN", "POINTS",
           "ROUND", "CrossSiteExchange", "EvalReports", "GlobalModel", "RoundExchange", "ServerRound", "SlotRound",
           "TrainReports", "run_server", "run_slot"]
