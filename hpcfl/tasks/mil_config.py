"""``task: mil``'s config section (``mil``) and the checks its per-key bounds cannot express.

It imports only :mod:`hpcfl.fields` and the errors, so the schema (hpcfl.config) includes it without
importing the task: it belongs to the config layer (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..fields import setting as _f
from ..errors import ConfigError


@dataclass(frozen=True)
class MilConfig:
    hidden: int = _f(128, help="width of the tile embedding before attention", min=1)
    attention: int = _f(64, help="width of the gated attention's hidden layer", min=1)
    dropout: float = _f(0.25, help="dropout on tile embeddings in training", min=0.0, max=0.9)
    attention_maps: bool = _f(True, help="at the end, each site writes the final global model's attention per tile of its validation slides to <run>/attention/ (heatmaps in the report)")
    instance_loss: Literal["none", "svm", "ce"] = _f("none", help="CLAM-SB's instance clustering loss: each training bag's instance_k most attended tiles are positives, its instance_k least attended negatives of its class's instance classifier, scored by smooth top-1 SVM (svm, as CLAM) or cross-entropy (ce); none = attention MIL alone")
    instance_k: int = _f(8, help="instance_loss: tiles pseudo-labelled at each end of a bag's attention (capped at half its tiles)", min=1)
    bag_weight: float = _f(0.7, help="instance_loss: loss = bag_weight * slide loss + (1 - bag_weight) * instance loss", min=0.0, max=1.0)



def check(cfg) -> None:
    """Combinations the per-key bounds cannot catch, refused at load with the key named."""
    if cfg.data.name != "features":
        raise ConfigError(f"task: mil learns from slide feature bags: set data.name: features "
                          f"(got {cfg.data.name!r})")
    if not cfg.data.bags.labels:
        raise ConfigError("data.bags.labels: task: mil needs a slide labels CSV (slide_id,label[,site])")


__all__ = ["MilConfig", "check"]
