"""The gated attention MIL network (Ilse et al. 2018) and its attention maps (torch; sites only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

ATTENTION_DIR = "attention"


class RunningStandardize(nn.Module):
    """(x - mean) / std per feature with running statistics in training AND evaluation (unlike BatchNorm,
    whose training-time statistics of a batch of one or two slides are each slide's own): the statistics
    are a momentum average of the valid tiles' (the first batch sets them), float buffers, so FedAvg averages
    them over sites with the weights and every site's model standardizes alike."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(x) > 1:
            with torch.no_grad():
                m = 1.0 if float(self.seen) == 0 else self.momentum
                self.mean.mul_(1 - m).add_(x.mean(0), alpha=m)
                self.var.mul_(1 - m).add_(x.var(0), alpha=m)
                self.seen.add_(1)
        return (x - self.mean) / torch.sqrt(self.var + self.eps)


class GatedAttentionMIL(nn.Module):
    """Tiles (B, N, dim) with ``lengths`` (B,) valid tiles per bag -> (logits (B, classes), attention (B, N)).

    The input features are standardized per feature (:class:`RunningStandardize`): encoder features carry
    large per-feature offsets (a DINO CNN's: mean 0.6, spread 0.09), and with them MIL did not learn
    (slide AUC 0.66 with a per-tile LayerNorm, 0.81 with BatchNorm over one bag, 0.99 with features
    standardized over all training tiles, on bench/pathology.py's data, centrally). Then a ReLU embedding,
    gated attention softmaxed over each bag's valid tiles, the attention-weighted mean embedding and a
    linear classifier. ``instance`` (``svm`` / ``ce``): CLAM-SB's instance classifiers too, one
    ``Linear(hidden, 2)`` per class (:meth:`instance_loss`); ``none`` builds none, so the model's weights
    and their initialisation are the plain network's."""

    def __init__(self, dim: int, hidden: int, attention: int, classes: int, dropout: float = 0.25,
                 instance: str = "none", instance_k: int = 8):
        super().__init__()
        self.norm = RunningStandardize(dim)
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, classes)
        self.instance, self.instance_k = instance, instance_k
        if instance != "none":
            self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(classes))

    def attend(self, x: torch.Tensor, lengths: torch.Tensor):
        """(tile embeddings h (B, N, hidden), attention (B, N), valid-tile mask (B, N))."""
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        z = torch.zeros_like(x)
        z[valid] = self.norm(x[valid])  # statistics of real tiles only, never of the padding
        h = self.embed(z)
        a = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        return h, torch.softmax(a.masked_fill(~valid, float("-inf")), dim=1), valid

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        h, a, _ = self.attend(x, lengths)
        return self.classifier((a.unsqueeze(-1) * h).sum(1)), a

    def bag_and_instance(self, x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor):
        """(bag logits, CLAM-SB instance loss) in one pass: see :func:`instance_loss`."""
        h, a, _ = self.attend(x, lengths)
        logits = self.classifier((a.unsqueeze(-1) * h).sum(1))
        return logits, instance_loss(h, a, lengths, labels, self.instance_classifiers, self.instance_k, self.instance)


def smooth_top1_svm(scores: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Smooth top-1 SVM (Berrada et al. 2018; CLAM's instance loss, the `topk` package's SmoothTop1SVM):
    per row ``tau * logsumexp((s_j + alpha [j != y] - s_y) / tau)`` over the last axis; their mean, or
    (``reduction="none"``) the rows' losses."""
    margin = alpha * (1 - nn.functional.one_hot(target, scores.shape[-1]).to(scores.dtype))
    rows = tau * torch.logsumexp((scores + margin - scores.gather(-1, target[..., None])) / tau, dim=-1)
    return rows.mean() if reduction == "mean" else rows


def instance_loss(h: torch.Tensor, a: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                  classifiers: nn.ModuleList, k: int, kind: str = "svm") -> torch.Tensor:
    """CLAM-SB's instance clustering loss (Lu et al. 2021, without subtyping): for each bag of class c, the
    k most attended tiles are positives and the k least attended negatives of class c's instance
    classifier; smooth top-1 SVM (``svm``) or cross-entropy (``ce``) over those 2k tiles, averaged over
    bags. k is capped at half a bag's tiles; bags of fewer than 2 tiles add nothing. All on the device,
    padded bags in one batch: no per-bag reads to the host."""
    b, n, _ = h.shape
    kk = min(k, n // 2)
    if kk < 1:
        return h.sum() * 0.0
    kb = torch.clamp(lengths // 2, max=kk)  # this bag's k
    valid = torch.arange(n, device=h.device)[None, :] < lengths[:, None]
    top = torch.topk(a.masked_fill(~valid, float("-inf")), kk, dim=1).indices
    bottom = torch.topk((-a).masked_fill(~valid, float("-inf")), kk, dim=1).indices
    tiles = h[torch.arange(b, device=h.device)[:, None], torch.cat([top, bottom], 1)]  # (B, 2kk, hidden)
    weight = torch.stack([c.weight for c in classifiers])[labels]  # (B, 2, hidden): the bag's class's
    bias = torch.stack([c.bias for c in classifiers])[labels]
    scores = torch.einsum("bkh,boh->bko", tiles, weight) + bias[:, None, :]
    target = torch.cat([torch.ones(kk, dtype=torch.long, device=h.device),
                        torch.zeros(kk, dtype=torch.long, device=h.device)]).expand(b, -1)
    if kind == "svm":
        per_tile = smooth_top1_svm(scores, target, reduction="none")
    else:
        per_tile = nn.functional.cross_entropy(scores.reshape(-1, 2), target.reshape(-1), reduction="none").view(b, -1)
    slot = (torch.arange(kk, device=h.device)[None, :] < kb[:, None]).repeat(1, 2).to(per_tile.dtype)
    per_bag = (per_tile * slot).sum(1) / slot.sum(1).clamp(min=1)
    used = (kb >= 1).to(per_bag.dtype)
    return (per_bag * used).sum() / used.sum().clamp(min=1)


def write_attention(module: Any, data: Any, ctx: Any, run_dir: Any) -> None:
    """Each validation slide this rank holds: ``<run>/attention/<slide>.npz`` with every tile's coordinates
    and attention under the final global model, the slide's label and scores (hpcfl report draws them)."""
    from ..checkpoint import write_npz_atomic

    out = Path(run_dir) / ATTENTION_DIR
    out.mkdir(parents=True, exist_ok=True)
    classes = data.labels.classes
    with torch.no_grad():
        for p in data.val_pos.tolist():
            bag = data.bags[p]
            x = torch.from_numpy(bag.features).to(ctx.device)[None]
            logits, att = module(x, torch.tensor([len(bag.features)], device=ctx.device))
            probs = torch.softmax(logits.float(), 1)[0].cpu().numpy().astype(np.float64)
            meta = {"slide_id": bag.slide_id, "site": ctx.site, "round": ctx.round, "label": classes[data.labels.labels[p]],
                    "classes": classes, "probabilities": probs.tolist(), "width": bag.meta.get("width"),
                    "height": bag.meta.get("height"), "index": bag.meta.get("index"),
                    "features_from": {k: bag.meta.get(k) for k in ("run", "round", "weights_sha256")}}
            write_npz_atomic(out / f"{bag.slide_id}.npz",
                             {"x": bag.x, "y": bag.y, "size0": bag.size0, "attention": att[0].float().cpu().numpy()},
                             meta, what=f"attention of slide {bag.slide_id}")
