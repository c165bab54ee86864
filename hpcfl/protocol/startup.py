"""The start-up exchanges, once per launch, before round 1: each a class with rank 0's half (``server``)
next to a slot leader's half (``slot``), run in the order of :data:`STARTUP` by both sides.

* :class:`LayoutExchange`: the leaders say how the model is flattened (all must agree);
* :class:`InitExchange`: rank 0 says whether the run is fresh; if so slot 0 sends its seeded
  initial weights, else rank 0 restores the checkpoint's model;
* :class:`SiteInfoExchange`: one :class:`~hpcfl.protocol.records.SiteInfo` per site;
* :class:`KeysExchange`: with secure aggregation, every site's public key, relayed by rank 0.

Each half reads and fills in one small context (:class:`ServerStart`, :class:`SlotStart`), so a
new start-up exchange is one class here (or anywhere) added to :data:`STARTUP`: neither loop changes.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..comm import recv_array, send_array
from ..errors import CheckpointError, TopologyError
from ..model import Entry, same_state, state_views
from .control import Exchange
from .message import Message
from .records import SiteInfo


@dataclass
class ServerStart:
    """What rank 0's halves read (the first four) and fill in."""

    fed: Any
    cfg: Any
    k: int
    restore: Optional[Dict[str, np.ndarray]] = None  # the checkpoint's model arrays (None: a fresh run)
    where: str = ""  # the run directory, for errors
    entries: List[Entry] = field(default_factory=list)
    weights: Optional[np.ndarray] = None
    sites: Optional[np.ndarray] = None  # (K, 3) int64: site, num_train, steps (SiteInfo.columns)
    extra: Dict[str, Any] = field(default_factory=dict)  # what an exchange defined elsewhere keeps


@dataclass
class SlotStart:
    """What a slot leader's halves read (the first six) and fill in."""

    fed: Any
    cfg: Any
    slot: int  # the slot's index
    model: Any  # hpcfl.model.FlatModel
    host_model: Callable[[], np.ndarray]  # the slot's model, on the host
    infos: Callable[[], List[SiteInfo]]  # the slot's sites' reports
    kind: Any = None  # the aggregation kind's slot half (secure aggregation keeps its keys there)
    sites: List[int] = field(default_factory=list)
    salt: Optional[bytes] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Layout(Message):
    signature: str
    entries: List[tuple]


@dataclass
class Verdict(Message):
    ok: bool
    why: str = ""


@dataclass
class Fresh(Message):
    fresh: bool = False


@dataclass
class SiteReport(Message):
    """A slot's sites' :class:`SiteInfo` as one (n, 3) int64 table: 10,000 sites' objects unpickled at rank 0
    cost it 3 MB."""

    table: np.ndarray


@dataclass
class PublicKeys(Message):
    keys: Dict[int, bytes]


class StartupExchange(Exchange):
    """Base of a start-up exchange: ``server(s: ServerStart)``, ``slot(s: SlotStart)``, ``wanted(cfg)``."""


class LayoutExchange(StartupExchange):
    """Leaders tell rank 0 how the model is flattened (all must agree); rank 0 never builds the model."""

    @staticmethod
    def server(s: ServerStart) -> None:
        got: List[Layout] = s.fed.gather(None, root=0)[1:]
        bad = [i for i in range(1, len(got)) if got[i].signature != got[0].signature]
        verdict = Verdict(not bad, f"slot(s) {', '.join(map(str, bad))} built a different model than slot 0 "
                                   "(parameter names or shapes differ)")
        s.fed.bcast(verdict, root=0)
        if bad:
            raise TopologyError(verdict.why)
        s.entries = [Entry(n, tuple(sh), o, k) for n, sh, o, k in got[0].entries]

    @staticmethod
    def slot(s: SlotStart) -> None:
        s.fed.gather(Layout(s.model.signature(), [tuple(astuple(e)) for e in s.model.entries]), root=0)
        verdict: Verdict = s.fed.bcast(None, root=0)
        if not verdict.ok:
            raise TopologyError(verdict.why)


class InitExchange(StartupExchange):
    """The first global model: the checkpoint's (restored at rank 0), or slot 0's seeded init (the same in
    every slot), sent to rank 0."""

    @staticmethod
    def server(s: ServerStart) -> None:
        s.weights = np.empty(sum(e.numel for e in s.entries), np.float32)
        if s.restore is not None:
            if not same_state(s.entries, ((k, v.shape) for k, v in s.restore.items())):
                raise CheckpointError(f"{s.where}: its checkpoint holds a different model than the sites build")
            for name, view in state_views(s.weights, s.entries).items():
                view[...] = s.restore[name]
        fresh = Fresh.bcast((s.fed,), s.k, Fresh(s.restore is None)).fresh
        s.restore = None  # restored: nothing keeps the checkpoint's arrays
        if fresh:
            recv_array(s.fed, s.weights, 1, s.cfg.launch.chunk_mb)

    @staticmethod
    def slot(s: SlotStart) -> None:
        if Fresh.bcast((s.fed,), 0).fresh and s.slot == 0:
            send_array(s.fed, s.host_model(), 0, s.cfg.launch.chunk_mb)


class SiteInfoExchange(StartupExchange):
    """What rank 0 needs to know about every site before round 1 (training set size, planned steps)."""

    @staticmethod
    def server(s: ServerStart) -> None:
        s.sites = SiteInfo.columns([m.table for m in s.fed.gather(None, root=0)[1:]], s.k)

    @staticmethod
    def slot(s: SlotStart) -> None:
        s.fed.gather(SiteReport(SiteInfo.table(s.infos())), root=0)


class KeysExchange(StartupExchange):
    """Secure aggregation: every site's public key, relayed by rank 0, which never sees a secret."""

    @staticmethod
    def wanted(cfg: Any) -> bool:
        return cfg.privacy.secure_aggregation is not None

    @staticmethod
    def server(s: ServerStart) -> None:
        public: List[Optional[bytes]] = [None] * s.k
        for got in s.fed.gather(None, root=0)[1:]:
            for site, key in got.keys.items():
                public[site] = key
        s.fed.bcast(public, root=0)

    @staticmethod
    def slot(s: SlotStart) -> None:
        keys = s.kind.own_keys(s.sites, s.salt)
        s.fed.gather(PublicKeys({site: key.public_bytes() for site, key in keys.items()}), root=0)
        s.kind.public = s.fed.bcast(None, root=0)


# The start-up exchanges, in the order both sides run them.
STARTUP: List[type] = [LayoutExchange, InitExchange, SiteInfoExchange, KeysExchange]


def run_server(s: ServerStart) -> ServerStart:
    for exchange in STARTUP:
        if exchange.wanted(s.cfg):
            exchange.server(s)
    return s


def run_slot(s: SlotStart) -> SlotStart:
    for exchange in STARTUP:
        if exchange.wanted(s.cfg):
            exchange.slot(s)
    return s


__all__ = ["STARTUP", "ServerStart", "SlotStart", "StartupExchange", "LayoutExchange", "InitExchange",
           "SiteInfoExchange", "KeysExchange", "run_server", "run_slot"]
