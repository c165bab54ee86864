"""Supervised classification (``task: classify``, the default): cross-entropy, accuracy, AUC.

Evaluation accumulates hpcfl.metrics' vector of SUMS on the device (loss,
correct, per-class counts, per-class score histograms); it crosses to the
host once per evaluation. The histogram binning is that of the NumPy reference
(``accumulate_metrics`` in tests/reference_impl.py), so the numbers are the same.
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

    def evaluate_many(self, module: Any, datas, ctx: StepContext):
        """The same sums for many sites in one pass: their validation batches go through the model
        together and every per-sample statistic is added to its site's row (bincount by site)."""
        import torch

        if len(datas) < 2:
            return [self.evaluate(module, d, ctx) for d in datas]
        c, bins = datas[0].num_classes, self.cfg.eval.auc_bins
        xs, ys, sid = [], [], []
        for k, d in enumerate(datas):
            for x, y in d.val_batches(self.cfg.train.eval_batch_size):
                xs.append(x)
                ys.append(y)
                sid.append(torch.full((y.shape[0],), k, dtype=torch.int64, device=y.device))
        out = torch.zeros((len(datas), M.vector_size(c, bins)), dtype=torch.float64, device=ctx.device)
        if xs:
            x, y, s = torch.cat(xs), torch.cat(ys), torch.cat(sid)
            bs = self.cfg.train.eval_batch_size
            with torch.no_grad():
                for b in range(0, len(y), bs):
                    accumulate_sites(out, module(x[b:b + bs]), y[b:b + bs], s[b:b + bs], c, bins)
        return list(out.cpu().numpy())

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
    """Add one batch into the sums vector ``vec`` (float64, on the device), as the NumPy reference in tests does."""
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


def accumulate_sites(out: Any, logits: Any, labels: Any, site: Any, num_classes: int, bins: int) -> None:
    """:func:`accumulate` for a batch mixing several sites: row ``site[i]`` of ``out`` gets sample i."""
    import torch
    import torch.nn.functional as F

    c, n_sites = num_classes, out.shape[0]
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none").double()
    probs = torch.softmax(logits, 1)
    hit = probs.argmax(1) == labels
    out[:, 0].index_add_(0, site, loss)
    out[:, 1].index_add_(0, site, hit.double())
    out[:, 2] += torch.bincount(site, minlength=n_sites)
    out[:, 3:3 + c] += torch.bincount(site[hit] * c + labels[hit], minlength=n_sites * c).view(n_sites, c)
    out[:, 3 + c:3 + 2 * c] += torch.bincount(site * c + labels, minlength=n_sites * c).view(n_sites, c)
    b = torch.clamp((probs * bins).long(), 0, bins - 1)
    pos = labels[:, None] == torch.arange(c, device=labels.device)[None, :]
    idx = (site[:, None] * c + torch.arange(c, device=labels.device)[None, :]) * bins + b
    hist = out[:, 3 + 2 * c:].view(n_sites, 2, c * bins)
    size = n_sites * c * bins
    hist[:, 0] += torch.bincount(idx[pos], minlength=size).view(n_sites, c * bins)
    hist[:, 1] += torch.bincount(idx[~pos], minlength=size).view(n_sites, c * bins)
