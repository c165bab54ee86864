"""Tiling: find the tissue, lay a tile grid over it, label every tile, write a Feather index.

Per slide (``hpcfl tile SLIDES_DIR --out INDEX_DIR``):

1. tissue detection on a low-resolution level: Otsu's threshold on the HSV
   saturation (stained tissue is saturated, glass is not);
2. a grid of ``tile_size`` tiles every ``stride`` pixels at ``level``; each tile
   gets its tissue fraction and a label, as in the source documents' tables:
   ``white_background`` / ``partial_tissue`` / ``tissue``;
3. its class, where a mask (``<slide>.mask.png``, any downsample) or a QuPath-
   style GeoJSON annotation (``<slide>.geojson``) is given: the majority class
   under the tile and that class's share;
4. one Feather file per slide (uncompressed, so it can be memory-mapped), and a
   PNG thumbnail with the tiles drawn on it: people check a tiling by looking.

A slide that is missing, unreadable, truncated or has no tissue is reported
with one line naming it; the others are still tiled, and the command exits
non-zero at the end.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import HpcflError
from .readers import SlideError, SlideReader, open_slide

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs")
TILING_VERSION = 2  # bump when tiling results change for the same parameters: indexes are rebuilt
LABELS = ("white_background", "partial_tissue", "tissue")
NO_CLASS = -1


@dataclass(frozen=True)
class TilingParams:
    level: int = 0
    tile_size: int = 256
    stride: int = 0  # 0 = tile_size (no overlap, no gaps)
    background_below: float = 0.05  # tissue fraction under which a tile is white_background
    tissue_from: float = 0.8  # tissue fraction from which a tile is tissue (between: partial_tissue)
    detect_max_side: int = 1024  # tissue detection runs on the largest level no bigger than this
    backend: str = "cucim"
    array_backend: str = "numpy"


def list_slides(slides_dir: Path) -> List[Path]:
    d = Path(slides_dir)
    if not d.is_dir():
        raise HpcflError(f"{d}: slides directory not found")
    return sorted(p for p in d.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith("."))


def detection_level(reader: SlideReader, max_side: int) -> int:
    """The most detailed level whose larger side is at most ``max_side`` (else the smallest level)."""
    for lvl in range(reader.level_count):
        if max(reader.level_dimensions(lvl)) <= max_side:
            return lvl
    return reader.level_count - 1


def tissue_mask(rgb: np.ndarray, array_backend: str = "numpy", smooth: float = 3.0) -> Tuple[np.ndarray, float]:
    """Boolean tissue mask by Otsu on (smoothed) HSV saturation, and the threshold used.

    Smoothing first matters: where nuclei are resolved, raw saturation is
    bimodal inside the tissue and Otsu would split nuclei from cytoplasm
    instead of tissue from glass.
    """
    from skimage.filters import gaussian, threshold_otsu

    from .arrays import saturation

    sat = gaussian(saturation(rgb, array_backend), sigma=smooth) if smooth > 0 else saturation(rgb, array_backend)
    if float(sat.max() - sat.min()) < 1e-3:
        return np.zeros(sat.shape, bool), 1.0
    t = float(threshold_otsu(sat))
    # Glass has saturation ~0.02; a threshold that low means there was no stained tissue to separate.
    t = max(t, 0.05)
    return sat > t, t


def _read_level(reader: SlideReader, level: int) -> np.ndarray:
    w, h = reader.level_dimensions(level)
    return reader.read_region(0, 0, level, (w, h))


def load_class_map(slide: Path, shape0: Tuple[int, int], classes: Sequence[str]) -> Optional[Tuple[np.ndarray, float, List[str]]]:
    """A class raster for a slide, from ``<stem>.mask.png`` or ``<stem>.geojson`` next to it.

    Returns (raster of class ids, 0 = none; its downsample vs level 0; class names), or None.
    """
    w0, h0 = shape0
    mask_png = slide.with_name(slide.stem + ".mask.png")
    if mask_png.exists():
        from PIL import Image

        try:
            m = np.asarray(Image.open(mask_png))
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"{mask_png}: cannot read mask: {exc}") from None
        if m.ndim != 2:
            raise SlideError(f"{mask_png}: mask must be single-channel class ids (0 = background)")
        names = list(classes)
        names += [f"class{k}" for k in range(len(names) + 1, int(m.max()) + 1)]  # values nobody named
        return m, w0 / m.shape[1], names
    geo = slide.with_name(slide.stem + ".geojson")
    if geo.exists():
        return _rasterize_geojson(geo, shape0, list(classes))
    return None


def _rasterize_geojson(path: Path, shape0: Tuple[int, int], classes: List[str]) -> Tuple[np.ndarray, float, List[str]]:
    """QuPath-style GeoJSON (Polygon/MultiPolygon features with properties.classification.name)."""
    from skimage.draw import polygon as fill_polygon

    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlideError(f"{path}: cannot read annotations: {exc}") from None
    feats = doc.get("features", [doc] if doc.get("type") == "Feature" else [])
    w0, h0 = shape0
    down = max(1.0, max(w0, h0) / 4096)
    raster = np.zeros((int(np.ceil(h0 / down)), int(np.ceil(w0 / down))), np.uint8)
    names = list(classes)
    for f in feats:
        props = f.get("properties") or {}
        cls = (props.get("classification") or {}).get("name") or props.get("class") or props.get("name")
        if not cls:
            continue
        if cls not in names:
            names.append(cls)
        geom = f.get("geometry") or {}
        polys = [geom.get("coordinates", [])] if geom.get("type") == "Polygon" else \
            geom.get("coordinates", []) if geom.get("type") == "MultiPolygon" else []
        for poly in polys:
            if not poly:
                continue
            ring = np.asarray(poly[0], dtype=np.float64) / down  # outer ring; holes are ignored
            rr, cc = fill_polygon(ring[:, 1], ring[:, 0], raster.shape)
            raster[rr, cc] = names.index(cls) + 1
    return raster, down, names


def _footprint(raster: np.ndarray, down: float, x0: int, y0: int, side0: float) -> np.ndarray:
    """Values of a low-resolution raster under a level-0 square (x0, y0, side0); at least one pixel."""
    h, w = raster.shape
    a, b = int(y0 / down), int(np.ceil((y0 + side0) / down))
    c, d = int(x0 / down), int(np.ceil((x0 + side0) / down))
    return raster[max(0, a):min(h, max(b, a + 1)), max(0, c):min(w, max(d, c + 1))]


@dataclass
class TiledSlide:
    columns: Dict[str, np.ndarray]  # the Feather table's columns
    thumbnail: np.ndarray  # RGB of the detection level
    thumbnail_down: float  # its downsample vs level 0
    side0: float  # a tile's side in level-0 pixels
    classes: List[str]


def tile_slide(path: Path, params: TilingParams, classes: Sequence[str] = ()) -> TiledSlide:
    """Tile one slide (raises SlideError naming it when it cannot)."""
    with open_slide(path, params.backend) as reader:
        if params.level >= reader.level_count:
            raise SlideError(f"{path}: tiling level {params.level} does not exist (the slide has {reader.level_count})")
        lvl = detection_level(reader, params.detect_max_side)
        thumb = _read_level(reader, lvl)
        mask, _ = tissue_mask(thumb, params.array_backend)
        if not mask.any():
            raise SlideError(f"{path}: no tissue found (Otsu on HSV saturation of level {lvl})")
        w0, h0 = reader.level_dimensions(0)
        wl, hl = reader.level_dimensions(params.level)
        ds = reader.level_downsample(params.level)
        mask_down = reader.level_downsample(lvl)
    class_map = load_class_map(Path(path), (w0, h0), classes)
    names = class_map[2] if class_map else list(classes)

    stride = params.stride or params.tile_size
    cols = np.arange(0, max(1, wl - params.tile_size + 1), stride)
    rows = np.arange(0, max(1, hl - params.tile_size + 1), stride)
    n = len(cols) * len(rows)
    out: Dict[str, np.ndarray] = {
        "row": np.repeat(np.arange(len(rows)), len(cols)).astype(np.int32),
        "col": np.tile(np.arange(len(cols)), len(rows)).astype(np.int32),
    }
    x0 = np.round(np.tile(cols, len(rows)) * ds).astype(np.int64)
    y0 = np.round(np.repeat(rows, len(cols)) * ds).astype(np.int64)
    side0 = params.tile_size * ds
    frac = np.empty(n, np.float32)
    cls = np.full(n, NO_CLASS, np.int16)
    cls_frac = np.zeros(n, np.float32)
    for i in range(n):
        sub = _footprint(mask, mask_down, x0[i], y0[i], side0)
        frac[i] = sub.mean() if sub.size else 0.0
        if class_map is not None:
            craster, cdown, _ = class_map
            sub = _footprint(craster, cdown, x0[i], y0[i], side0)
            if sub.size:
                counts = np.bincount(sub.ravel(), minlength=len(names) + 1)
                k = int(counts.argmax())  # unannotated pixels count: a tile takes the class covering most of it
                if k > 0:
                    cls[i], cls_frac[i] = k - 1, counts[k] / sub.size
    label = np.where(frac < params.background_below, 0, np.where(frac >= params.tissue_from, 2, 1)).astype(np.int8)
    slide_id = Path(path).stem
    out.update({
        "slide_id": np.full(n, slide_id, dtype=object), "path": np.full(n, str(Path(path).resolve()), dtype=object),
        "x": x0, "y": y0, "level": np.full(n, params.level, np.int16), "size": np.full(n, params.tile_size, np.int32),
        "tissue_fraction": frac, "tile_label": np.asarray(LABELS, dtype=object)[label],
        "class_id": cls, "class_name": np.asarray(["" if c < 0 else names[c] for c in cls], dtype=object),
        "class_fraction": cls_frac,
    })
    return TiledSlide(out, thumb, mask_down, side0, names)


def write_feather(columns: dict, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.feather as feather

    order = ["slide_id", "path", "x", "y", "level", "size", "row", "col", "tissue_fraction", "tile_label",
             "class_id", "class_name", "class_fraction"]
    arrays = []
    for k in order:
        v = columns[k]
        arr = pa.array(v.tolist() if v.dtype == object else v)
        if k in ("slide_id", "path", "tile_label", "class_name"):
            arr = arr.dictionary_encode()
        arrays.append(arr)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    feather.write_feather(pa.table(arrays, names=order), tmp, compression="uncompressed")
    os.replace(tmp, path)


THUMBNAIL_MAX_SIDE = 2048  # a thumbnail is for looking at: a 2967-px detection level becomes 2048
# Outline colours of the tile labels (white_background tiles are not drawn) and fill colours of classes:
# a qualitative palette whose colours differ from both outlines and from each other.
LABEL_COLOURS = {"tissue": (0, 160, 0), "partial_tissue": (255, 127, 14)}
CLASS_COLOURS = [(31, 119, 180), (214, 39, 40), (148, 103, 189), (23, 190, 207), (140, 86, 75), (227, 119, 194),
                 (188, 189, 34), (127, 127, 127), (0, 0, 128), (128, 0, 0)]


def thumbnail_scale(width: int, height: int, extra_height: int = 0, max_side: int = THUMBNAIL_MAX_SIDE) -> float:
    """Factor (<= 1) that fits the image plus a legend strip of ``extra_height`` px into ``max_side``."""
    return min(1.0, max_side / width, (max_side - extra_height) / height)


def _legend_entries(t: TiledSlide) -> List[Tuple[str, Tuple[int, int, int], bool]]:
    """(text, colour, is_outline) for the labels and the classes present, with their tile counts."""
    labels = t.columns["tile_label"]
    out = [(f"{lab} ({int((labels == lab).sum())})", LABEL_COLOURS[lab], True) for lab in LABELS if lab in LABEL_COLOURS]
    out.append((f"white_background ({int((labels == 'white_background').sum())}, not drawn)", (255, 255, 255), True))
    ids = t.columns["class_id"]
    for k in sorted(int(c) for c in np.unique(ids) if c >= 0):
        out.append((f"{t.classes[k]} ({int((ids == k).sum())})", CLASS_COLOURS[k % len(CLASS_COLOURS)], False))
    return out


def draw_thumbnail(t: TiledSlide, path: Path, max_side: int = THUMBNAIL_MAX_SIDE) -> None:
    """The detection level (longest side at most ``max_side``) with tissue/partial tiles outlined by label,
    tiles with a class filled (translucent) in its colour, and a legend strip below."""
    from PIL import Image, ImageDraw, ImageFont

    entries = _legend_entries(t)
    h0, w0 = t.thumbnail.shape[:2]
    f = thumbnail_scale(w0, h0, 0, max_side)
    size = max(11, min(22, int(w0 * f) // 60))  # legend text readable next to the slide, not dominating it
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    row_h, swatch = size + 6, size - 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [swatch + 6 + int(measure.textlength(e[0], font=font)) + 2 * size for e in entries]
    for _ in range(2):  # the legend wraps at the final width, which leaves room for the legend
        width = max(1, int(round(w0 * f)))
        rows, x = 1, 4
        for wd in widths:
            if x + wd > width and x > 4:
                rows, x = rows + 1, 4
            x += wd
        legend_h = rows * row_h + 6
        f = thumbnail_scale(w0, h0, legend_h, max_side)
    width, height = max(1, int(round(w0 * f))), max(1, int(round(h0 * f)))
    img = Image.fromarray(t.thumbnail).convert("RGB")
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    down = t.thumbnail_down / f  # level-0 pixels per thumbnail pixel
    s = t.side0 / down
    fill = Image.new("RGBA", img.size, (0, 0, 0, 0))
    fdraw = ImageDraw.Draw(fill)
    draw = ImageDraw.Draw(img)
    cols = t.columns
    for x, y, lab, cid in zip(cols["x"], cols["y"], cols["tile_label"], cols["class_id"]):
        colour = LABEL_COLOURS.get(lab)
        if colour is None:
            continue
        x, y = x / down, y / down
        box = [x, y, x + max(s, 1.0) - 1, y + max(s, 1.0) - 1]
        if cid >= 0:
            fdraw.rectangle(box, fill=CLASS_COLOURS[int(cid) % len(CLASS_COLOURS)] + (90,))
        if s >= 4:
            draw.rectangle(box, outline=colour)
        elif cid < 0:
            draw.rectangle(box, fill=colour)  # too small to outline
    img = Image.alpha_composite(img.convert("RGBA"), fill).convert("RGB")
    canvas = Image.new("RGB", (width, height + legend_h), (255, 255, 255))
    canvas.paste(img, (0, 0))
    _draw_legend(ImageDraw.Draw(canvas), entries, widths, (width, height), row_h, swatch, font)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)


def _draw_legend(draw, entries, widths, size, row_h: int, swatch: int, font) -> None:
    """The legend strip below a thumbnail of ``size`` (width, height): a swatch and a label per entry, wrapped."""
    width, height = size
    x, y = 4, height + 4
    for (text, colour, outline), wd in zip(entries, widths):
        if x + wd > width and x > 4:
            x, y = 4, y + row_h
        if outline:
            draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], outline=colour if colour != (255, 255, 255)
                           else (160, 160, 160), width=2)
        else:
            draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=colour)
        draw.text((x + swatch + 6, y), text, fill=(0, 0, 0), font=font)
        x += wd


def tile_directory(slides_dir: Path, out_dir: Path, params: TilingParams, classes: Sequence[str] = (),
                   progress: bool = True) -> Tuple[List[dict], List[str]]:
    """Tile every slide of a directory. Returns (per-slide summaries, failure lines)."""
    slides = list_slides(slides_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = Path(slides_dir) / "slides.json"
    if not classes and meta_path.exists():
        classes = json.loads(meta_path.read_text()).get("classes", [])
    classes = list(classes)
    done: List[dict] = []
    failures: List[str] = []
    bar = _progress(slides, progress)
    for path in bar:
        try:
            t = tile_slide(path, params, classes)
        except SlideError as exc:
            failures.append(str(exc))
            continue
        for c in t.classes:
            if c not in classes:
                classes.append(c)
        cols = t.columns
        write_feather(cols, out_dir / f"{path.stem}.feather")
        draw_thumbnail(t, out_dir / f"{path.stem}.thumbnail.png")
        counts = {lab: int((cols["tile_label"] == lab).sum()) for lab in LABELS}
        done.append({"slide_id": path.stem, "path": str(path.resolve()), "tiles": len(cols["x"]), **counts,
                     "classes": {c: int(((cols["class_name"] == c) & (cols["tile_label"] == "tissue")).sum())
                                 for c in classes}})
    index = {"version": TILING_VERSION, "params": asdict(params), "classes": classes, "slides": done,
             "failures": failures}
    tmp = out_dir / f".index.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out_dir / "index.json")
    return done, failures


def _progress(items, enabled: bool):
    """A bar on a terminal, plain lines in a log file (hpcfl.console)."""
    if not enabled:
        return items
    from ..console import progress_iter

    return progress_iter(items, "tiling", "slide", sys.stderr)
