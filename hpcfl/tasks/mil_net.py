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
    linear classifier."""

    def __init__(self, dim: int, hidden: int, attention: int, classes: int, dropout: float = 0.25):
        super().__init__()
        self.norm = RunningStandardize(dim)
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        z = torch.zeros_like(x)
        z[valid] = self.norm(x[valid])  # statistics of real tiles only, never of the padding
        h = self.embed(z)
        a = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        a = torch.softmax(a.masked_fill(~valid, float("-inf")), dim=1)
        return self.classifier((a.unsqueeze(-1) * h).sum(1)), a


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
