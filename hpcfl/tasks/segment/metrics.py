"""Segmentation metrics from sums, so they add up exactly over items, ranks and sites.

An evaluation adds every validation item into one float64 vector::

    [loss sum, items, confusion matrix C x C (row = label, column = prediction, pixel counts),
     (with Hausdorff) HD95 sum per class, HD95 count per class]

Per-class Dice is ``2 I_c / (P_c + G_c)`` with ``I_c`` the diagonal, ``P_c`` the column and
``G_c`` the row sums of the summed confusion matrix: the Dice of all predictions and labels
pooled, whichever ranks and sites they were split over (pixel counts are integers, exact in
float64 below 2^53). Not a mean of per-batch or per-image Dice, which would depend on the split.
Pure NumPy: rank 0 summarizes without torch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np


def vector_size(num_classes: int, hausdorff: bool) -> int:
    return 2 + num_classes * num_classes + (2 * num_classes if hausdorff else 0)


def classes_of(size: int, hausdorff: bool) -> int:
    """Inverse of :func:`vector_size` (the class count is not in the vector)."""
    extra = 2 if hausdorff else 0
    c = int((-extra + math.isqrt(extra * extra + 4 * (size - 2))) // 2)
    if c < 1 or vector_size(c, hausdorff) != size:
        raise ValueError(f"a segmentation metrics vector of {size} values fits no class count"
                         f" ({'with' if hausdorff else 'without'} Hausdorff sums)")
    return c


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C pixel counts (row = label, column = prediction) of integer class maps of one shape."""
    idx = np.asarray(label, np.int64).ravel() * num_classes + np.asarray(pred, np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def dice_from_confusion(cm: np.ndarray) -> List[Optional[float]]:
    """Dice of each class from a (summed) confusion matrix; None where the class is neither labelled
    nor predicted anywhere (undefined, left out of the mean)."""
    cm = np.asarray(cm, np.float64)
    inter, pred, gt = np.diag(cm), cm.sum(0), cm.sum(1)
    return [float(2 * i / (p + g)) if p + g > 0 else None for i, p, g in zip(inter, pred, gt)]


def mean_dice(dice: List[Optional[float]], include_background: bool) -> Optional[float]:
    vals = [d for k, d in enumerate(dice) if d is not None and (include_background or k > 0)]
    return float(np.mean(vals)) if vals else None


def summarize(vec: np.ndarray, hausdorff: bool, include_background: bool) -> Dict[str, Any]:
    """mean_dice (the headline), per-class dice (index = label value, background at 0), loss, pixel
    accuracy, the per-class pixel counts behind Dice and, when summed, the mean HD95 over items and
    foreground classes."""
    vec = np.asarray(vec, np.float64)
    c = classes_of(len(vec), hausdorff)
    n = float(vec[1])
    cm = vec[2:2 + c * c].reshape(c, c)
    dice = dice_from_confusion(cm)
    total = float(cm.sum())
    out: Dict[str, Any] = {
        "mean_dice": mean_dice(dice, include_background), "dice": dice,
        "loss": float(vec[0] / n) if n else None, "pixel_accuracy": float(np.trace(cm) / total) if total else None,
        "samples": int(n),
        # the sums Dice comes from, per class: anyone can pool them over sites and recompute it
        "intersection": [int(v) for v in np.diag(cm)], "predicted": [int(v) for v in cm.sum(0)],
        "labelled": [int(v) for v in cm.sum(1)],
    }
    if hausdorff:
        s, k = vec[2 + c * c:2 + c * c + c], vec[2 + c * c + c:]
        per = [float(a / b) if b else None for a, b in zip(s, k)]
        lo = 0 if include_background else 1
        out["hd95_per_class"] = per
        out["hd95"] = float(s[lo:].sum() / k[lo:].sum()) if k[lo:].sum() else None
    return out
