"""metrics.jsonl records as (series, tag, value) scalars: the one mapping TensorBoard and MLflow share.

Generic on purpose: every numeric field of every record becomes a scalar
(nested dicts flattened with ``/``), so a new task's metric keys appear
without touching this module. Identity fields say *where* a value goes:

- ``kind: round`` (the federation's summary of a round) -> series ``""``,
  tag = the field path (``val_accuracy``, ``time/train_s``, ``dp_epsilon``);
- a record with a ``site`` -> series ``sites/<site>``, tag =
  ``<split>/<model>/<field>`` (``val/global/accuracy``, ``val/local/loss``,
  ``train/local/update_norm``), plus ``participation`` (1 returned, 0 not)
  from its ``status``; records of other kinds get their kind as a prefix;
- anything else -> series ``""``, tag ``<kind>/<field>``.

TensorBoard overlays series of one tag, so each site is its own series
(a subdirectory): one chart per metric shows every site.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

# Fields that say where a record belongs, not what was measured.
IDENTITY = ("kind", "round", "site", "split", "model", "status")

Scalar = Tuple[str, str, float]  # (series, tag, value)


def flatten(d: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, float]]:
    """Numeric leaves of a nested dict as (``a/b/c``, float): bools count as 0/1, a list of numbers gives
    ``key/0``, ``key/1``, ... (per-class recall), strings and other lists are skipped."""
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from flatten(v, key)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            yield from flatten({str(i): x for i, x in enumerate(v)}, key)
        elif isinstance(v, bool):
            yield key, float(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, float(v)
        elif type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            item = v.item()
            if isinstance(item, (int, float)):
                yield key, float(item)


def site_series(site: str) -> str:
    return f"sites/{site}"


def record_scalars(rec: Dict[str, Any]) -> List[Scalar]:
    """The scalars of one metrics.jsonl record (see the module docstring)."""
    kind = rec.get("kind", "")
    fields = {k: v for k, v in rec.items() if k not in IDENTITY}
    if kind == "round":
        return [("", tag, v) for tag, v in flatten(fields)]
    if "site" in rec:
        parts = [p for p in (None if kind == "site" else kind, rec.get("split"), rec.get("model")) if p]
        prefix = "/".join(str(p) for p in parts)
        out = [(site_series(rec["site"]), tag, v) for tag, v in flatten(fields, prefix)]
        if "status" in rec and kind == "site" and rec.get("split") == "val" and rec.get("model", "global") == "global":
            out.append((site_series(rec["site"]), "participation", 1.0 if rec["status"] == "returned" else 0.0))
        return out
    return [("", tag, v) for tag, v in flatten(fields, str(kind) if kind else "")]


def cross_site_scalars(doc: Dict[str, Any]) -> List[Scalar]:
    """cross_site.json as scalars: series ``sites/<data site>``, tag ``cross_site/<model>/<metric>``."""
    out: List[Scalar] = []
    for model, per_site in (doc.get("models") or {}).items():
        for site, metrics in (per_site or {}).items():
            out.extend((site_series(site), f"cross_site/{model}/{k}", v) for k, v in flatten(metrics or {}))
    return out

