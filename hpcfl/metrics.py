"""Validation metrics from sums, so they add up exactly over ranks and sites.

Every rank evaluates its share of a site's validation data into one float64
vector of SUMS (loss, correct, per-class counts, per-class score histograms);
vectors are summed within the site (allreduce) and gathered by rank 0, which
computes the metrics of each site and of the federation (the sum over sites)
with the functions here. Nothing is averaged twice, nothing is approximated
except the AUC's score binning (error below 1/bins).
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def vector_size(num_classes: int, bins: int) -> int:
    return 3 + 2 * num_classes + 2 * num_classes * bins


def binned_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from score histograms (ascending bins); ties within a bin count one half. NaN if a side is empty."""
    p, q = float(pos.sum()), float(neg.sum())
    if p == 0 or q == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (p * q))


def binned_aucs(pos: np.ndarray, neg: np.ndarray) -> list:
    """:func:`binned_auc` of every row (class) at once, the same operations per row, so the same floats: rank 0
    summarizes up to ``eval.sites_max`` sites a round, where a Python loop over the classes showed in py-spy."""
    p, q = pos.sum(axis=1), neg.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = num / (p * q)
    auc[(p == 0) | (q == 0)] = np.nan
    return [float(a) for a in auc]


def summarize(vec: np.ndarray, num_classes: int, bins: int) -> Dict[str, object]:
    """loss, accuracy, per-class recall, balanced accuracy and macro one-vs-rest AUC from a sums vector."""
    c = num_classes
    n = max(float(vec[2]), 1.0)
    correct_c, count_c = vec[3:3 + c], vec[3 + c:3 + 2 * c]
    hist = vec[3 + 2 * c:].reshape(2, c, bins)
    recall = [float(a / b) if b else None for a, b in zip(correct_c, count_c)]
    present = [r for r in recall if r is not None]
    aucs = binned_aucs(hist[0], hist[1])
    finite = [a for a in aucs if not np.isnan(a)]
    return {
        "loss": float(vec[0] / n), "accuracy": float(vec[1] / n), "samples": int(vec[2]),
        "recall": recall, "balanced_accuracy": float(np.mean(present)) if present else None,
        "auc": float(np.mean(finite)) if finite else None,
    }

