"""``task: mil``: gated attention multiple-instance learning on slide labels (Ilse et al. 2018).

A slide is a bag of tile feature vectors (``hpcfl features``); one label per
slide. The model embeds each tile, scores it with gated attention
(``w . (tanh(V h) * sigmoid(U h))``), takes the attention-weighted mean of the
embeddings and classifies it: the CLAM-SB / HistoFL recipe; CLAM-SB's instance
clustering loss is optional (``mil.instance_loss``: the most and least attended
tiles of a bag are pseudo-labelled for a per-class instance classifier). Bags vary in size: a batch pads them, and padded tiles get no
attention.

Evaluation sums, exact over ranks and sites: loss, correct and per-class counts,
then for every slide of the federation (its position in the slide list,
:mod:`hpcfl.features.bags`) its class probabilities and label + 1, written only
by the site that owns it, so the sum over sites is every slide's score: rank 0
computes the ROC AUC of the pooled scores exactly (AUC cannot be averaged over
sites), and each site's AUC from its own vector.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from .base import DataSpec, StepContext, Task


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (ties count one half): the Mann-Whitney U statistic over all pairs, as
    sklearn.metrics.roc_auc_score computes it; None without both classes."""
    pos = np.asarray(positive, bool)
    s = np.asarray(scores, np.float64)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    r = avg_rank[inverse]
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def layout(size: int, num_classes: int) -> int:
    """Slides held by a vector of ``size`` values for ``num_classes`` classes."""
    slides, rem = divmod(size - 3 - 2 * num_classes, num_classes + 1)
    if rem or slides < 0:
        raise ValueError(f"a MIL metrics vector of {size} values does not fit {num_classes} classes")
    return slides


def summarize_mil(vec: np.ndarray, num_classes: int) -> Dict[str, Any]:
    """Metrics of a sums vector. Pure NumPy (rank 0)."""
    c = num_classes
    vec = np.asarray(vec, np.float64)
    n = float(vec[2])
    correct_c, count_c = vec[3:3 + c], vec[3 + c:3 + 2 * c]
    slides = vec[3 + 2 * c:].reshape(layout(len(vec), c), c + 1)
    held = slides[:, c] > 0
    probs, labels = slides[held, :c], np.rint(slides[held, c]).astype(np.int64) - 1
    recall = [float(a / b) if b else None for a, b in zip(correct_c, count_c)]
    present = [r for r in recall if r is not None]
    if c == 2:
        auc = roc_auc(labels == 1, probs[:, 1])
    else:  # macro one-vs-rest over the classes that have positives and negatives here
        each = [roc_auc(labels == k, probs[:, k]) for k in range(c)]
        each = [a for a in each if a is not None]
        auc = float(np.mean(each)) if each else None
    return {"loss": float(vec[0] / n) if n else None, "accuracy": float(vec[1] / n) if n else None,
            "balanced_accuracy": float(np.mean(present)) if present else None, "auc": auc, "recall": recall,
            "samples": int(n)}


def pooled_scores(vec: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) of the slides a (summed) vector holds, in slide-list order."""
    c = num_classes
    slides = np.asarray(vec, np.float64)[3 + 2 * c:].reshape(-1, c + 1)
    held = slides[:, c] > 0
    return np.rint(slides[held, c]).astype(np.int64) - 1, slides[held, :c]


class MilTask(Task):
    name = "mil"
    metrics = ("auc", "accuracy", "balanced_accuracy", "loss")
    headline = ("auc", "accuracy")

    @classmethod
    def check_config(cls, cfg) -> None:
        from .mil_config import check

        check(cfg)

    def _layout(self) -> Tuple[int, int]:
        """(slides, classes) of the federation, from the labels and the feature directory (any rank)."""
        from ..features.bags import slide_labels

        lab = slide_labels(self.cfg)
        return len(lab.slide_ids), len(lab.classes)

    def build_model(self, spec: DataSpec) -> Any:
        from .mil_net import GatedAttentionMIL

        m = self.cfg.mil
        if len(spec.input_shape) != 1:
            raise ConfigError(f"task: mil needs feature vectors; data {self.cfg.data.name!r} gives {spec.input_shape}")
        return GatedAttentionMIL(spec.input_shape[0], m.hidden, m.attention, spec.num_classes, m.dropout,
                                 m.instance_loss, m.instance_k)

    def loss(self, module: Any, batch: Tuple[Any, Any], ctx: StepContext):
        import torch.nn.functional as F

        x, y = batch
        m = self.cfg.mil
        if m.instance_loss == "none":
            logits, _ = module(x, y[:, 1])
            return F.cross_entropy(logits, y[:, 0]), {}
        logits, inst = module.bag_and_instance(x, y[:, 1], y[:, 0])
        bag = F.cross_entropy(logits, y[:, 0])
        return m.bag_weight * bag + (1 - m.bag_weight) * inst, {"bag_loss": bag.detach(), "instance_loss": inst.detach()}

    def eval_size(self, spec: DataSpec) -> int:
        slides, c = self._layout()
        return 3 + 2 * c + slides * (c + 1)

    def evaluate(self, module: Any, data: Any, ctx: StepContext) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        slides, c = self._layout()
        vec = torch.zeros(3 + 2 * c + slides * (c + 1), dtype=torch.float64, device=ctx.device)
        per = vec[3 + 2 * c:].view(slides, c + 1)
        with torch.no_grad():
            for x, y in data.val_batches(self.cfg.train.eval_batch_size):
                x, y = x.to(ctx.device), y.to(ctx.device)
                logits, _ = module(x, y[:, 1])
                logits = logits.float()
                lab = y[:, 0]
                hit = logits.argmax(1) == lab
                vec[0] += F.cross_entropy(logits, lab, reduction="sum").double()
                vec[1] += hit.sum()
                vec[2] += len(lab)
                vec[3:3 + c] += torch.bincount(lab[hit], minlength=c)[:c]
                vec[3 + c:3 + 2 * c] += torch.bincount(lab, minlength=c)[:c]
                per[y[:, 2], :c] = torch.softmax(logits, 1).double()
                per[y[:, 2], c] = (lab + 1).double()
        return vec.cpu().numpy()

    def summarize(self, vec: np.ndarray) -> Dict[str, Any]:
        return summarize_mil(vec, self._layout()[1])

    def encoder(self, module: Any) -> Any:
        raise ConfigError("task: mil: its model embeds slides, not tiles; extract features with the encoder's run")

    def end_of_run(self, module: Any, data: Any, ctx: StepContext, run_dir: Any) -> None:
        if self.cfg.mil.attention_maps:
            from .mil_net import write_attention

            write_attention(module, data, ctx, run_dir)
