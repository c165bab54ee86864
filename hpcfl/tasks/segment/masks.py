"""Per-pixel class masks of WSI tiles, at tile resolution, from each slide's class raster.

A slide's raster is ``<stem>.mask.png`` (class ids, 0 = background, any downsample; hpcfl's
synthetic slides write one) or a QuPath GeoJSON ``<stem>.geojson``, read as the tiler reads it
(:func:`hpcfl.wsi.tiling.load_class_map`). A tile's mask samples the raster at the centre of each
output pixel (nearest: class ids are not averaged). A slide without a raster, a raster that does
not cover the slide at one downsample, or one holding a value outside the declared classes is a
DataError naming the file. No torch: rank 0 checks every slide's mask before the sites start.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

from ...errors import DataError
from .volumes import check_labels

_MASKS: Dict[str, Tuple[np.ndarray, float]] = {}
_LOCK = threading.Lock()


def mask_file(slide: Path) -> Path:
    for suffix in (".mask.png", ".geojson"):
        p = slide.with_name(slide.stem + suffix)
        if p.exists():
            return p
    return slide.with_name(slide.stem + ".mask.png")


def load_slide_mask(slide: str, shape0: Tuple[int, int], classes: Sequence[str]) -> Tuple[np.ndarray, float]:
    """(class raster, its downsample from level 0) of a slide, checked against the slide and the classes."""
    from ...wsi.readers import SlideError
    from ...wsi.tiling import load_class_map

    path = Path(slide)
    try:
        got = load_class_map(path, shape0, list(classes))
    except SlideError as exc:
        raise DataError(str(exc)) from None
    if got is None:
        raise DataError(f"{path}: no class mask for task segment ({path.stem}.mask.png of class ids, 0 = "
                        f"background, or {path.stem}.geojson next to the slide)")
    raster, down, _ = got
    w0, h0 = shape0
    rh, rw = raster.shape
    # A raster made at one downsample covers the slide to within a pixel of the raster along both axes.
    if abs(rh * down - h0) > down + 1 or abs(rw * down - w0) > down + 1:
        raise DataError(f"{mask_file(path)}: a {rw}x{rh} mask does not match the {w0}x{h0} slide at one downsample "
                        f"(it gives {rw * down:.0f}x{rh * down:.0f}): its tiles' masks would not line up")
    check_labels(raster, len(classes) + 1, str(mask_file(path)), classes)
    return raster, down


def shared_mask(slide: str, shape0: Tuple[int, int], classes: Sequence[str]) -> Tuple[np.ndarray, float]:
    """:func:`load_slide_mask` once per process and slide (read-only)."""
    with _LOCK:
        hit = _MASKS.get(slide)
        if hit is None:
            raster, down = load_slide_mask(slide, shape0, classes)
            raster.setflags(write=False)
            hit = _MASKS[slide] = (raster, down)
        return hit


def tile_mask(raster: np.ndarray, down: float, x0: float, y0: float, side0: float, size: int) -> np.ndarray:
    """(size, size) class ids of the level-0 square (x0, y0, side0), sampled at each output pixel's centre."""
    centres = (np.arange(size) + 0.5) * (side0 / size)
    rows = np.clip(((y0 + centres) / down).astype(np.int64), 0, raster.shape[0] - 1)
    cols = np.clip(((x0 + centres) / down).astype(np.int64), 0, raster.shape[1] - 1)
    return raster[rows[:, None], cols[None, :]]


def check_index_masks(index, classes: Sequence[str], backend: str) -> None:
    """Rank 0: every slide of the tile index has a mask that fits it and holds only declared classes."""
    from ...wsi.readers import open_slide

    for path in index.slide_paths:
        with open_slide(path, backend) as r:
            shape0 = r.level_dimensions(0)
        load_slide_mask(path, shape0, classes)


def tile_classes(cfg, index) -> Tuple[str, ...]:
    """The declared foreground classes of a tile segmentation: segment.classes, else the tile index's."""
    return tuple(cfg.segment.classes) or tuple(index.classes)
