"""One feature file per slide: tile coordinates, one vector per tile, and where the vectors came from.

``<dir>/<slide_id>.npz`` (written atomically with every array's SHA-256, as
checkpoints are: :func:`hpcfl.checkpoint.write_npz_atomic`) holds ``x``, ``y``
(level-0 pixels of each tile's top-left corner), ``size`` (tile side at
``level``), ``level`` and ``features`` (tiles x dim, float16 or float32), and a
JSON ``meta`` with the provenance: the run directory, round and checkpoint of
the encoder, the SHA-256 of its weights, the task, the input size, the tile
index and the slide's level-0 size. ``<dir>/features.json`` is the manifest of
the last extraction (tiles/s per rank and in all).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import HpcflError

MANIFEST = "features.json"
# What must match for an existing file to count as done (the rest, e.g. the run's path, may differ).
SAME_MODEL = ("weights_sha256", "input_size", "encoder", "tiles")


class FeatureError(HpcflError):
    """A feature file is missing, unreadable, or was made by another model."""


def feature_path(out_dir, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}.npz"


def weights_digest(model: Dict[str, np.ndarray]) -> str:
    """SHA-256 over the entries' names, dtypes, shapes and bytes, in name order (the model's identity)."""
    h = hashlib.sha256()
    for name in sorted(model):
        a = np.ascontiguousarray(model[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_meta(path: Path) -> Optional[Dict[str, Any]]:
    """The provenance of an existing feature file without loading its vectors; None when there is none."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(z["meta"].tobytes().decode())
    except Exception:  # noqa: BLE001 - a damaged or foreign file: it is made again
        return {"unreadable": True}


def verdict(meta: Optional[Dict[str, Any]], want: Dict[str, Any]) -> str:
    """"todo" (no file, or a damaged one), "done" (same model and tiles) or "other" (another model's)."""
    if meta is None or meta.get("unreadable"):
        return "todo"
    return "done" if all(meta.get(k) == want.get(k) for k in SAME_MODEL) else "other"


def describe(meta: Dict[str, Any]) -> str:
    return (f"run {meta.get('run')}, round {meta.get('round')}, weights {str(meta.get('weights_sha256'))[:12]}, "
            f"input {meta.get('input_size')} px, {meta.get('tiles')} tiles")


@dataclass
class Bag:
    """One slide's features as the MIL task reads them."""

    slide_id: str
    features: np.ndarray  # (tiles, dim) float32
    x: np.ndarray
    y: np.ndarray
    size0: np.ndarray  # tile side in level-0 pixels
    meta: Dict[str, Any]


def load_bag(path) -> Bag:
    """A feature file, checksums verified (FeatureError in one line naming it otherwise)."""
    from ..checkpoint import read_npz
    from ..errors import CheckpointError

    path = Path(path)
    try:
        meta, arrays = read_npz(path)
    except CheckpointError as exc:
        raise FeatureError(str(exc).replace("checkpoint", "feature file")) from None
    missing = [k for k in ("features", "x", "y", "size0") if k not in arrays]
    if missing:
        raise FeatureError(f"{path}: not an hpcfl feature file (no {', '.join(missing)})")
    return Bag(str(meta.get("slide_id", path.stem)), arrays["features"].astype(np.float32, copy=False),
               arrays["x"], arrays["y"], arrays["size0"], meta)


def load_bags(feature_dir, slide_ids: Sequence[str]) -> List[Bag]:
    """The bags of ``slide_ids``; a missing file is a FeatureError naming the slide and the fix."""
    d = Path(feature_dir)
    missing = [s for s in slide_ids if not feature_path(d, s).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FeatureError(f"data.bags.dir: {d} has no features of {len(missing)} labelled slide(s): {shown}; "
                           "run `hpcfl features RUN_DIR --out DIR` first")
    bags = [load_bag(feature_path(d, s)) for s in slide_ids]
    dims = {b.features.shape[1] for b in bags}
    if len(dims) > 1:
        raise FeatureError(f"data.bags.dir: {d} mixes feature sizes {sorted(dims)}: made by different encoders")
    models = {b.meta.get("weights_sha256") for b in bags}
    if len(models) > 1:
        raise FeatureError(f"data.bags.dir: {d} holds features of {len(models)} different models; "
                           "extract them again with one (hpcfl features --redo)")
    return bags


def feature_slide_ids(feature_dir) -> List[str]:
    return sorted(p.stem for p in Path(feature_dir).glob("*.npz"))


__all__ = ["Bag", "FeatureError", "MANIFEST", "feature_path", "load_bag", "load_bags", "read_meta", "verdict",
           "weights_digest", "describe", "feature_slide_ids"]
