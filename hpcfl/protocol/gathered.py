"""Rules that need every site's update, not a sum: coordinate-wise (median, trimmed mean) and
selection (Krum, Multi-Krum).

Rank 0 never holds K models: the updates travel chunk by chunk (``launch.chunk_mb``)
through a Gatherv, so it holds K chunks at a time; a slot leader keeps the
updates of the sites it simulated this round until they are sent. Selection
rules gather for pairwise distances first, rank 0 picks the sites to keep and
says so, and then the kept sites' updates travel as a mean
(:class:`hpcfl.protocol.mean.MeanKind`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..device import chunks
from .kinds import Kind, mean_of_sum, register
from .mean import MeanKind
from .message import Message, per_site


def _counts(site_order: Sequence[Sequence[int]]) -> List[int]:
    return [0] + [len(s) for s in site_order]


class GatheredUpdates:
    """Both halves of the chunked Gatherv of per-site updates."""

    def __init__(self, size: int, chunk_mb: int, k: int, slot_sites: Sequence[Sequence[int]]):
        self.size, self.chunk_mb, self.k = size, chunk_mb, k
        self.slot_sites = [list(s) for s in slot_sites]  # every slot's sites, in slot order (rank 0 needs them)
        self.rows = [i for s in self.slot_sites for i in s]  # site index of each gathered row
        self.updates: Dict[int, np.ndarray] = {}

    def steps(self) -> List[Tuple[int, int]]:
        return list(chunks(self.size, 4, self.chunk_mb))

    # -- slot half ------------------------------------------------------------------------------------
    def keep(self, site: int, update: np.ndarray) -> None:
        buf = self.updates.get(site)
        if buf is None:
            buf = self.updates[site] = np.empty(self.size, np.float32)
        np.copyto(buf, update)

    def send(self, fed: Any, mine: Sequence[int], back: np.ndarray) -> None:
        for s, e in self.steps():
            out = np.zeros((len(mine), e - s), np.float32)
            for row, site in enumerate(mine):
                if back[site] and site in self.updates:
                    out[row] = self.updates[site][s:e]
            fed.Gatherv(out, None, root=0)

    # -- rank 0 half ----------------------------------------------------------------------------------
    def receive(self, fed: Any):
        """Yield ``(start, stop, chunk)`` with ``chunk`` (K, stop - start) in site order."""
        from mpi4py import MPI

        counts = np.asarray(_counts(self.slot_sites))
        order = np.argsort(self.rows)  # gathered rows -> site order
        for s, e in self.steps():
            c = e - s
            buf = np.empty((self.k, c), np.float32)
            sizes = [int(x) for x in counts * c]
            displs = [int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]])]
            fed.Gatherv(MPI.IN_PLACE, [buf, sizes, displs, MPI.FLOAT], root=0)
            yield s, e, buf[order]


@dataclass
class Kept(Message):
    """Rank 0 -> leaders, after the distance gather: the sites a selection rule keeps."""

    keep: np.ndarray = per_site(bool)


@register("coordinate")
class CoordinateKind(Kind):
    """Median / trimmed mean: the rule runs on each (K, chunk) block at rank 0."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gathered = GatheredUpdates(self.size, self.chunk_mb, self.k, self.slot_sites)

    def add_site(self, site: int, update: np.ndarray, weight: float) -> None:
        self.gathered.keep(site, update)

    def upload(self, fed: Any, back: np.ndarray, mine: Sequence[int]) -> None:
        self.gathered.send(fed, mine, back)

    def aggregate(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
                  rows: Dict[int, Any]) -> Dict[str, Any]:
        strategy.begin_round(int(back.sum()))
        n = num_train[back]
        for s, e, chunk in self.gathered.receive(fed):
            strategy.aggregate_chunk(chunk[back], n, acc[s:e])
        return {}


@register("select")
class SelectKind(Kind):
    """Krum / Multi-Krum: distances from gathered chunks, then the mean of the kept sites."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gathered = GatheredUpdates(self.size, self.chunk_mb, self.k, self.slot_sites)
        self.kept = MeanKind(*args)  # the kept sites' weighted updates travel as a sum
        self.weights: Dict[int, float] = {}

    def begin_round(self, ctl: Any, r: int) -> None:
        self.weights = {}

    def add_site(self, site: int, update: np.ndarray, weight: float) -> None:
        self.gathered.keep(site, update)
        self.weights[site] = weight

    def upload(self, fed: Any, back: np.ndarray, mine: Sequence[int]) -> None:
        self.gathered.send(fed, mine, back)
        keep = Kept.bcast((fed,), self.k).keep
        self.kept.begin_round(None, 0)
        for site in mine:
            if keep[site] and back[site]:
                self.kept.add_site(site, self.gathered.updates[site], self.weights[site])
        self.kept.upload(fed, back, mine)

    def select(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray) -> np.ndarray:
        """Rank 0: the (K,) mask of kept sites, after the distance gather; told to the leaders."""
        idx = np.flatnonzero(back)
        strategy.begin_round(len(idx))
        for s, e, chunk in self.gathered.receive(fed):
            strategy.accumulate_distances(chunk[back])
        chosen = strategy.select(num_train[back])
        keep = np.zeros(self.k, bool)
        keep[idx[chosen]] = True
        return Kept.bcast((fed,), self.k, Kept(keep)).keep

    def aggregate(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
                  rows: Dict[int, Any]) -> Dict[str, Any]:
        keep = self.select(fed, strategy, back, num_train)
        self.kept.receive_sum(fed, acc)
        info = mean_of_sum(strategy, acc, back, keep, num_train, rows)
        return {"krum_kept": [self.names[i] for i in np.flatnonzero(keep)], **info}
