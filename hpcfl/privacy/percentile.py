"""Percentile privacy (Shokri & Shmatikov 2015), as Clara/NVFlare's ``PercentilePrivacy``.

A site shares only the largest ``percent``% of its update by magnitude, each
shared value clipped to ``[-gamma, gamma]``: small coordinates, which leak
most about individual samples relative to their usefulness, never leave the site.
This is a heuristic, not a formal DP guarantee.

Ties at the threshold are all kept, so slightly more than ``percent``% may be
shared when many entries have the same magnitude (e.g. exact zeros at 100%).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from ..errors import ConfigError, HpcflError


def _real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def percentile_filter(delta: np.ndarray, percent: float, gamma: float, out: Optional[np.ndarray] = None) -> int:
    """Keep the top ``percent``% of ``|delta|`` clipped to ``[-gamma, gamma]``, zero the rest.

    Writes into ``out`` (may be ``delta`` itself; defaults to ``delta``, i.e. in
    place) and returns the number of entries shared. The threshold is the
    ``ceil(n * percent / 100)``-th largest ``|delta|``, found with a partial
    sort (``ndarray.partition``); every entry with ``|delta| >= threshold`` is kept.
    """
    if not (_real(percent) and 0 < percent <= 100):
        raise ConfigError(f"privacy.percentile.percent must be in (0, 100], got {percent!r}")
    if not (_real(gamma) and gamma > 0 and math.isfinite(gamma)):
        raise ConfigError(f"privacy.percentile.gamma must be a finite number > 0, got {gamma!r}")
    if out is None:
        out = delta
    n = delta.size
    if n == 0:
        return 0
    k = min(n, max(1, math.ceil(n * percent / 100.0)))
    mag = np.abs(delta)  # the one model-sized temporary besides the boolean mask
    mag.partition(n - k)
    if np.isnan(mag[n - k:]).any():  # NaNs sort last, so any NaN lands in this tail
        raise HpcflError("percentile privacy: the model update contains NaN")
    thr = mag[n - k]
    np.abs(delta, out=mag)
    drop = np.less(mag, thr)
    del mag
    np.clip(delta, -gamma, gamma, out=out)
    np.copyto(out, 0, where=drop)
    return int(n - np.count_nonzero(drop))
