"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the sites' weights.

Split into the part each site computes (:func:`contribution`, its weights times
its sample count) and the part the aggregator computes on the *sum* of those
(:func:`finalize`). The sum in between is an MPI ``Reduce``, so the aggregator
never holds more than one accumulator, whatever the number of sites.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def contribution(weights: np.ndarray, num_samples: float, out: Optional[np.ndarray] = None) -> np.ndarray:
    """A site's pre-weighted upload: ``num_samples * weights``."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return np.multiply(weights, np.float32(num_samples), out=out)


def finalize(summed: np.ndarray, total_samples: float, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The new global weights from the sum of contributions."""
    if total_samples <= 0:
        raise ValueError("no samples were aggregated (every site reported 0)")
    return np.divide(summed, np.float32(total_samples), out=out)


def fedavg(weights: Sequence[np.ndarray], num_samples: Sequence[float]) -> np.ndarray:
    """Reference FedAvg over in-memory arrays, accumulating one at a time (constant memory)."""
    if len(weights) != len(num_samples) or not weights:
        raise ValueError("need one sample count per weight array, and at least one")
    acc = np.zeros_like(weights[0], dtype=np.float32)
    tmp = np.empty_like(acc)
    for w, n in zip(weights, num_samples):
        acc += contribution(w, n, out=tmp)
    return finalize(acc, float(sum(num_samples)), out=acc)
