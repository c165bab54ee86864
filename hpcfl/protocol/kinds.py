"""Aggregation kinds: ONE object per way of aggregating, owning both transport halves and rank 0's math.

A strategy declares its ``kind`` (the math decides it: a mean needs only a sum, a median every
update, Krum distances first); :func:`make_kind` picks the kind's class once per launch, on rank 0
and on every slot leader, and from then on the round loops talk only to the :class:`Kind`:

* slot leader: :meth:`Kind.begin_round`, :meth:`Kind.add_site` (each trained site's filtered update
  and the weight the strategy gives it), :meth:`Kind.upload`;
* rank 0: :meth:`Kind.aggregate` leaves the aggregated update in rank 0's one model-sized buffer
  (then the strategy's ``finalize`` makes the new global model); privacy wrappers of the strategy
  take part through :meth:`hpcfl.aggregation.strategies.Strategy.on_sum`.

Built in: ``mean`` (a Reduce; masked integers with secure aggregation: :mod:`.mean`),
``coordinate`` and ``select`` (a chunked Gatherv: :mod:`.gathered`). A new kind is one class
decorated with :func:`register` in one module, and a strategy whose ``kind`` names it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import numpy as np

KINDS: Dict[str, Type["Kind"]] = {}


def register(name: str) -> Callable[[Type["Kind"]], Type["Kind"]]:
    """Class decorator: the kind strategies name with ``kind = name``."""

    def add(cls: Type["Kind"]) -> Type["Kind"]:
        cls.name = name
        KINDS[name] = cls
        return cls

    return add


class Kind:
    """Both halves of one way of aggregating; built by :meth:`build` from the launch's settings."""

    name = "base"
    fuses = False  # has add_difference: a site's update taken, weighted and added in one pass (no filters)

    def __init__(self, size: int, chunk_mb: int, k: int, slot_sites: Sequence[Sequence[int]], names: Sequence[str]):
        self.size, self.chunk_mb, self.k = size, chunk_mb, k
        self.slot_sites = [list(s) for s in slot_sites]  # every slot's sites, in slot order
        self.names = list(names)
        self.window: Any = None  # hpcfl.comm.SharedModels where the kind moves models through shared memory

    # -- both halves -----------------------------------------------------------------------------------
    def share(self, fed: Any, weights: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """After start-up, on rank 0 and every leader: set up shared memory if the kind uses it (returns rank
        0's weights, moved there; None: nothing moved)."""
        return None

    def close(self) -> None:
        """End of the run, on rank 0 and every leader."""

    @classmethod
    def build(cls, cfg: Any, strategy: Any, size: int, topology: Any) -> "Kind":
        return cls(size, cfg.launch.chunk_mb, len(topology.sites), [s.sites for s in topology.slots], topology.names)

    # -- slot leader's half ----------------------------------------------------------------------------
    def begin_round(self, ctl: Any, r: int) -> None:
        """Before the round's first site trains (``ctl``: the round's plan)."""

    def add_site(self, site: int, update: np.ndarray, weight: float) -> None:
        raise NotImplementedError

    def upload(self, fed: Any, back: np.ndarray, mine: Sequence[int]) -> None:
        """Send what rank 0 needs (``back``: the sites whose updates count; ``mine``: this slot's sites)."""
        raise NotImplementedError

    # -- rank 0's half ---------------------------------------------------------------------------------
    def aggregate(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
                  rows: Dict[int, Any]) -> Dict[str, Any]:
        """The aggregated update into ``acc``; returns what the round's record says about it."""
        raise NotImplementedError

    def update(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
               weights: np.ndarray, r: int, rows: Dict[int, Any]) -> Dict[str, Any]:
        """Round ``r``'s new global model, in place in ``weights``: :meth:`aggregate`, then the strategy's
        ``finalize`` (a kind may do both in one pass where the strategy is plain)."""
        info = self.aggregate(fed, strategy, back, num_train, acc, rows)
        strategy.finalize(acc, weights, r)
        return info


def mean_of_sum(strategy: Any, acc: np.ndarray, back: np.ndarray, keep: np.ndarray, num_train: np.ndarray,
                rows: Dict[int, Any]) -> Dict[str, Any]:
    """Rank 0's math on a received sum of weighted updates: the strategy's wrappers see the sum (DP noise),
    then it becomes the weighted mean of the ``keep`` sites' updates."""
    from ..aggregation import fedavg

    info = strategy.on_sum(acc, back, rows)
    fedavg.finalize(acc, total_weight(strategy, keep, num_train), out=acc)
    return info


def total_weight(strategy: Any, keep: np.ndarray, num_train: np.ndarray) -> float:
    """The sum of the weights the ``keep`` sites' updates carry (what the sum is divided by)."""
    return float(sum(strategy.upload_weight(num_train[i]) for i in np.flatnonzero(keep)))


def plain_mean(strategy: Any) -> bool:
    """Whether the rule is ``weights += sum / total`` and nothing else (FedAvg, FedProx: no privacy wrapper
    seeing the sum, no server optimizer), so a kind may fuse the three passes into one."""
    from ..aggregation.strategies import Strategy

    return type(strategy).finalize is Strategy.finalize and type(strategy).on_sum is Strategy.on_sum


def make_kind(cfg: Any, strategy: Any, size: int, topology: Any) -> Kind:
    """The kind ``strategy`` declares (chosen once per launch, by every side the same way)."""
    from . import gathered, mean  # noqa: F401 - they register the built-in kinds

    cls = KINDS.get(strategy.kind)
    if cls is None:
        raise ValueError(f"strategy {strategy.name!r} is of kind {strategy.kind!r}, which no aggregation kind "
                         f"implements ({', '.join(sorted(KINDS))})")
    return cls.build(cfg, strategy, size, topology)


__all__: List[str] = ["KINDS", "Kind", "make_kind", "mean_of_sum", "plain_mean", "register", "total_weight"]
