"""The gated attention MIL network (Ilse et al. 2018) and its attention maps (torch; sites only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

ATTENTION_DIR = "attention"


class GatedAttentionMIL(nn.Module):
    """Tiles (B, N, dim) with ``lengths`` (B,) valid tiles per bag -> (logits (B, classes), attention (B, N)).

    LayerNorm on the input features (encoders differ in scale), a ReLU embedding, gated attention
    softmaxed over each bag's valid tiles, the attention-weighted mean embedding, a linear classifier."""

    def __init__(self, dim: int, hidden: int, attention: int, classes: int, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        h = self.embed(x)
        a = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
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
