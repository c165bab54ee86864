"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum / Multi-Krum.

None of these is a sum, so none can be MPI-Reduced: the transport gathers the K
participating sites' updates one chunk at a time, a ``(K, c)`` array with
``c <= CHUNK``, and the functions here work on one chunk. Rank 0 therefore holds
K chunk-sized rows, never K model-sized ones.

* Median and trimmed mean are per coordinate, so a chunk's result depends on that
  chunk only (:func:`median_chunk`, :func:`trimmed_mean_chunk`).
* Krum needs whole-model distances, but a squared Euclidean distance is a sum over
  coordinates, so per-chunk partial distances add up
  (:func:`accumulate_sq_distances`) into a ``(K, K)`` matrix; selection then needs
  only that matrix (:func:`krum_scores_from_distances`, :func:`multikrum_select_from_distances`).

All rules here are unweighted: they ignore the sites' sample counts, since a
Byzantine site could lie about those. (After Krum selection, the transport takes a
sample-weighted mean of the kept sites.)

The un-chunked reference functions (:func:`median`, :func:`trimmed_mean`,
:func:`krum_scores`, :func:`multikrum_select`) take a whole ``(K, n)`` stack and
are for tests and documentation.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np


def _check_stack(stack: np.ndarray) -> None:
    if stack.ndim != 2 or stack.shape[0] < 1:
        raise ValueError(f"expected a (num_sites, n) array with num_sites >= 1, got shape {stack.shape}")


def num_trimmed(num_sites: int, beta: float) -> int:
    """floor(beta * K), the number of values trimmed at each end; error if nothing would be left."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"fl.robust.trim_fraction must be in [0, 0.5), got {beta}")
    k = int(math.floor(beta * num_sites + 1e-9))  # 1e-9: 0.29 * 100 is 28.999999999999996
    if 2 * k >= num_sites:
        raise ValueError(f"trimmed mean with trim_fraction {beta} trims 2*{k} of {num_sites} sites, leaving none")
    return k


# --- coordinate-wise rules, one chunk at a time -------------------------------------------------

def median_chunk(updates: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of a ``(K, c)`` chunk into ``out`` (even K: mean of the two middle values)."""
    _check_stack(updates)
    if out.shape != updates.shape[1:]:
        raise ValueError(f"out has shape {out.shape}, expected {updates.shape[1:]}")
    np.median(updates, axis=0, out=out)
    return out


def trimmed_mean_chunk(updates: np.ndarray, beta: float, out: np.ndarray) -> np.ndarray:
    """Coordinate-wise trimmed mean of a ``(K, c)`` chunk into ``out``.

    Drops the floor(beta*K) largest and smallest values per coordinate and takes the
    unweighted mean (in float64) of the remaining ones.
    """
    _check_stack(updates)
    if out.shape != updates.shape[1:]:
        raise ValueError(f"out has shape {out.shape}, expected {updates.shape[1:]}")
    num_sites = updates.shape[0]
    k = num_trimmed(num_sites, beta)
    kept = np.sort(updates, axis=0)[k:num_sites - k] if k else updates
    out[...] = np.sum(kept, axis=0, dtype=np.float64) / (num_sites - 2 * k)
    return out


# --- Krum ---------------------------------------------------------------------------------------

def accumulate_sq_distances(updates: np.ndarray, dist: np.ndarray, scratch: Optional[np.ndarray] = None) -> None:
    """Add the chunk's pairwise squared Euclidean distances (float64) into the symmetric ``(K, K)`` ``dist``."""
    _check_stack(updates)
    num_sites, c = updates.shape
    if dist.shape != (num_sites, num_sites):
        raise ValueError(f"distance matrix has shape {dist.shape}, chunk has {num_sites} sites")
    if scratch is None or scratch.shape[0] < c or scratch.dtype != np.float64:
        scratch = np.empty(c, np.float64)
    d = scratch[:c]
    for i in range(num_sites):
        for j in range(i + 1, num_sites):
            np.subtract(updates[j], updates[i], out=d, dtype=np.float64)
            sq = float(np.dot(d, d))
            dist[i, j] += sq
            dist[j, i] += sq


def pairwise_sq_distances(stack: np.ndarray) -> np.ndarray:
    """Reference: the ``(K, K)`` matrix of squared Euclidean distances, in float64."""
    _check_stack(stack)
    x = stack.astype(np.float64)
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def check_krum(num_sites: int, f: int) -> None:
    if f < 0:
        raise ValueError(f"fl.robust.byzantine must be >= 0, got {f}")
    if num_sites < 2 * f + 3:
        raise ValueError(f"Krum needs at least 2*f+3 = {2 * f + 3} sites for fl.robust.byzantine={f}, "
                         f"got {num_sites}")


def krum_scores_from_distances(dist: np.ndarray, f: int) -> np.ndarray:
    """Score of site i: the sum of its squared distances to its K - f - 2 nearest other sites."""
    num_sites = dist.shape[0]
    check_krum(num_sites, f)
    nearest = num_sites - f - 2
    scores = np.empty(num_sites, np.float64)
    for i in range(num_sites):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:nearest].sum()
    return scores


def multikrum_select_from_distances(dist: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Boolean mask (K,) of the ``m`` lowest-score sites (ties: lower index first). m=1 is Krum."""
    num_sites = dist.shape[0]
    if not 1 <= m <= num_sites:
        raise ValueError(f"fl.robust.krum_keep must be in [1, {num_sites}] (number of sites), got {m}")
    scores = krum_scores_from_distances(dist, f)
    keep = np.zeros(num_sites, bool)
    keep[np.argsort(scores, kind="stable")[:m]] = True
    return keep


# --- reference (un-chunked) versions ------------------------------------------------------------

def median(stack: np.ndarray) -> np.ndarray:
    """Reference coordinate-wise median of a ``(K, n)`` stack, float32."""
    _check_stack(stack)
    return np.median(stack, axis=0).astype(np.float32)


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Reference coordinate-wise trimmed mean of a ``(K, n)`` stack, float32."""
    _check_stack(stack)
    num_sites = stack.shape[0]
    k = num_trimmed(num_sites, beta)
    s = np.sort(stack.astype(np.float64), axis=0)
    return s[k:num_sites - k].mean(axis=0).astype(np.float32)


def krum_scores(stack: np.ndarray, f: int) -> np.ndarray:
    """Reference Krum scores of a ``(K, n)`` stack."""
    return krum_scores_from_distances(pairwise_sq_distances(stack), f)


def multikrum_select(stack: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Reference Multi-Krum selection mask of a ``(K, n)`` stack."""
    return multikrum_select_from_distances(pairwise_sq_distances(stack), f, m)


__all__ = ["num_trimmed", "median_chunk", "trimmed_mean_chunk", "accumulate_sq_distances",
           "pairwise_sq_distances", "check_krum", "krum_scores_from_distances",
           "multikrum_select_from_distances", "median", "trimmed_mean", "krum_scores", "multikrum_select"]
