"""What a site does to its update before it leaves: composable filters, applied in order.

``d = w_local - w_global`` goes through the filters the config asks for, each a
small object with one method, in this order: parameters kept private
(``exclude_vars``, and entries the task keeps per site) are zeroed, percentile
privacy keeps the largest entries, DP clipping bounds the L2 norm. A new filter
is one more class, not one more branch in the transport.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .dp import clip_, l2_norm
from .exclude import zero_slices
from .percentile import percentile_filter


@dataclass
class UploadInfo:
    """What a filter chain reports about one update."""

    clip: float = 0.0  # the round's DP clip norm (from rank 0's plan)
    norm: float = 0.0  # L2 norm of the update (before DP clipping)
    clipped: bool = False


class UploadFilter:
    def apply(self, d: np.ndarray, info: UploadInfo) -> None:
        raise NotImplementedError


class KeepPrivate(UploadFilter):
    """Entries that never leave the site travel as zeros (the aggregate leaves them unchanged)."""

    def __init__(self, slices: Sequence[Tuple[int, int]]):
        self.slices = list(slices)

    def apply(self, d, info):
        zero_slices(d, self.slices)


class Percentile(UploadFilter):
    """Percentile privacy (Shokri & Shmatikov 2015): the largest ``percent``% entries, clipped to gamma."""

    def __init__(self, percent: float, gamma: float):
        self.percent, self.gamma = percent, gamma

    def apply(self, d, info):
        percentile_filter(d, self.percent, self.gamma, out=d)


class ClipNorm(UploadFilter):
    """DP-FedAvg: scale the update to L2 norm at most the round's clip norm."""

    def apply(self, d, info):
        info.norm, info.clipped = clip_(d, info.clip)


def upload_filters(cfg, private_slices: Sequence[Tuple[int, int]]) -> List[UploadFilter]:
    pv = cfg.privacy
    out: List[UploadFilter] = []
    if private_slices:
        out.append(KeepPrivate(private_slices))
    if pv.percentile is not None:
        out.append(Percentile(pv.percentile.percent, pv.percentile.gamma))
    if pv.dp is not None:
        out.append(ClipNorm())
    return out


def filter_update(filters: Sequence[UploadFilter], d: np.ndarray, clip: float,
                  norm: Optional[float] = None) -> UploadInfo:
    """Apply ``filters`` to ``d`` in place; the norm is the DP clipper's, else that of the filtered update
    (``norm``: d's, already computed, used when no filter changes d: a 25M model's norm costs a pass)."""
    info = UploadInfo(clip=clip)
    for f in filters:
        f.apply(d, info)
    if not any(isinstance(f, ClipNorm) for f in filters):
        info.norm = norm if norm is not None and not filters else l2_norm(d)
    return info


def is_finite(d: np.ndarray) -> bool:
    return math.isfinite(l2_norm(d))


__all__ = ["UploadInfo", "UploadFilter", "KeepPrivate", "Percentile", "ClipNorm", "upload_filters",
           "filter_update", "is_finite"]
