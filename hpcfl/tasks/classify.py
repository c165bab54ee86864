"""Supervised classification (``task: classify``, the default): cross-entropy, accuracy, AUC.

Evaluation accumulates hpcfl.metrics' vector of SUMS on the device (loss,
correct, per-class counts, per-class score histograms); it crosses to the
host once per evaluation. The histogram binning is the NumPy one of
:func:`hpcfl.metrics.accumulate`, so the numbers are the same.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from .. import metrics as M
from .base import DataSpec, StepContext, Task


class ClassifyTask(Task):
    name = "classify"
    metrics = ("loss", "accuracy", "auc", "balanced_accuracy")
    headline = ("accuracy", "loss")

    def build_model(self, spec: DataSpec) -> Any:
        from ..model import build_model

        return build_model(self.cfg, int(np.prod(spec.input_shape)), spec.num_classes, spec.input_shape)

    def loss(self, module: Any, batch: Tuple[Any, Any], ctx: StepContext):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(module(x), y), {}

    # -- evaluation ---------------------------------------------------------------------------------
    def eval_size(self, spec: DataSpec) -> int:
        return M.vector_size(spec.num_classes, self.cfg.eval.auc_bins)

    def evaluate(self, module: Any, data: Any, ctx: StepContext) -> np.ndarray:
        import torch

        c, bins = data.num_classes, self.cfg.eval.auc_bins
        vec = torch.zeros(M.vector_size(c, bins), dtype=torch.float64, device=ctx.device)
        with torch.no_grad():
            for x, y in data.val_batches(self.cfg.train.eval_batch_size):
                accumulate(vec, module(x), y, c, bins)
        return vec.cpu().numpy()

    def summarize(self, vec: np.ndarray) -> Dict[str, Any]:
        c = num_classes_of(len(vec), self.cfg.eval.auc_bins)
        return M.summarize(vec, c, self.cfg.eval.auc_bins)


def num_classes_of(size: int, bins: int) -> int:
    """Inverse of metrics.vector_size (the class count is not in the vector)."""
    c, rem = divmod(size - 3, 2 + 2 * bins)
    if rem:
        raise ValueError(f"a metrics vector of {size} values does not hold {bins}-bin histograms")
    return c


def accumulate(vec: Any, logits: Any, labels: Any, num_classes: int, bins: int) -> None:
    """Add one batch into the sums vector ``vec`` (float64, on the device), as hpcfl.metrics.accumulate does."""
    import torch
    import torch.nn.functional as F

    c = num_classes
    n = labels.shape[0]
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    probs = torch.softmax(logits, 1)
    pred = probs.argmax(1)
    hit = pred == labels
    vec[0] += loss_sum.double()
    vec[1] += hit.sum()
    vec[2] += n
    vec[3:3 + c] += torch.bincount(labels[hit], minlength=c)[:c]
    vec[3 + c:3 + 2 * c] += torch.bincount(labels, minlength=c)[:c]
    b = torch.clamp((probs * bins).long(), 0, bins - 1)
    pos = labels[:, None] == torch.arange(c, device=labels.device)[None, :]
    idx = torch.arange(c, device=labels.device)[None, :] * bins + b
    hist = vec[3 + 2 * c:].view(2, c * bins)
    hist[0] += torch.bincount(idx[pos], minlength=c * bins)
    hist[1] += torch.bincount(idx[~pos], minlength=c * bins)
