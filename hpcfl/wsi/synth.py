"""Synthetic H&E-like whole-slide images with class masks, and a pyramidal TIFF / Aperio SVS writer.

Tests, benchmarks and demos need slides that both reader backends open, that carry
ground-truth tissue classes, and that are not trivially easy: the classes differ in
texture (fibres, nucleus size, crowding and shape) the way real H&E does, while a
per-slide stain perturbation (as between hospitals) makes their mean colours overlap.

Rendering follows Beer-Lambert: per pixel a haematoxylin and an eosin concentration,
``RGB = background * exp(-(cH * vH + cE * vE))``. Region geometry (tissue, holes,
class regions) lives on a coarse grid and is upsampled bilinearly; texture (fibres,
granules, nuclei stamped from per-slide sprite banks) is drawn at full resolution.
Everything is vectorised numpy; one RNG per (seed, slide index) makes slides reproducible.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

TISSUE_CLASSES: Tuple[str, ...] = ("stroma", "tumor", "lymphocytes", "necrosis")
MASK_BACKGROUND = 0

_STROMA, _TUMOR, _LYMPH, _NECROSIS = range(4)
PATTERNS: Tuple[str, ...] = ("focus", "atypia")  # what makes a labelled synthetic slide `tumour` (LabelPlan)
_GRID = 8  # full-resolution pixels per cell of the coarse geometry grid
# Ruifrok-style optical-density directions (R, G, B); eosin tilted to blue so it renders pink, not magenta.
_H_VECTOR = np.array([0.65, 0.70, 0.29])
_E_VECTOR = np.array([0.09, 0.88, 0.46])
# (haematoxylin, eosin) concentration of each class's ground substance; nuclei and fibres come on top.
_BASE_STAIN = {_STROMA: (0.05, 0.48), _TUMOR: (0.24, 0.40), _LYMPH: (0.18, 0.26), _NECROSIS: (0.09, 0.36)}


# --------------------------------------------------------------------------------------------- pyramid writer

def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 box-filter downsample (odd sizes repeat their last row/column, so no pixel is dropped)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    acc = img[0::2, 0::2].astype(np.uint16)
    acc += img[1::2, 0::2]
    acc += img[0::2, 1::2]
    acc += img[1::2, 1::2]
    acc += 2
    return (acc >> 2).astype(np.uint8)


def _aperio_description(w0: int, h0: int, w: int, h: int, tile: int, quality: int, mpp: float) -> str:
    """ImageDescription as Aperio scanners write it: OpenSlide and cuCIM detect the format by its 'Aperio' prefix."""
    tail = f"|AppMag = {10.0 / mpp:g}|MPP = {mpp:.4f}"
    if (w, h) == (w0, h0):
        return f"Aperio Image Library v12.0.0\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}{tail}"
    return f"Aperio Image Library v12.0.0\r\n{w0}x{h0} -> {w}x{h} - {tail}"


def write_pyramid(path, rgb: np.ndarray, tile: int = 256, quality: int = 90, aperio: bool = False,
                  mpp: float = 0.25, min_level_size: int = 512) -> int:
    """Write RGB uint8 (H, W, 3) as a tiled JPEG pyramidal TIFF; returns the number of levels.

    Each level is its own top-level page (level 0 subfiletype 0, reduced levels subfiletype 1,
    each half the previous while its shorter side stays >= ``min_level_size``): cuCIM and
    OpenSlide see only one level in a SubIFD pyramid. ``aperio=True`` writes Aperio
    ImageDescriptions so OpenSlide reports vendor 'aperio' (name the file .svs). The file is
    written under a temporary name and renamed, so readers never see half a slide.
    """
    import tifffile

    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"write_pyramid needs an RGB uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"TIFF tile size must be a positive multiple of 16, got {tile}")
    if not 1 <= quality <= 100 or mpp <= 0:
        raise ValueError(f"need 1 <= quality <= 100 and mpp > 0 (got quality={quality}, mpp={mpp})")
    levels = [np.ascontiguousarray(rgb)]
    while min(levels[-1].shape[:2]) // 2 >= max(1, min_level_size):
        levels.append(_halve(levels[-1]))
    h0, w0 = rgb.shape[:2]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # Classic TIFF offsets are 32-bit; JPEG shrinks ~10x, so only huge images need BigTIFF.
        with tifffile.TiffWriter(tmp, bigtiff=sum(lv.nbytes for lv in levels) > 2 ** 33) as tw:
            for i, lv in enumerate(levels):
                h, w = lv.shape[:2]
                px_per_cm = 1e4 / (mpp * w0 / w)
                tw.write(lv, photometric="rgb", tile=(tile, tile), compression="jpeg",
                         compressionargs={"level": quality}, subfiletype=0 if i == 0 else 1,
                         description=_aperio_description(w0, h0, w, h, tile, quality, mpp) if aperio else None,
                         resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                         metadata=None, software="hpcfl", maxworkers=min(4, os.cpu_count() or 1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(levels)


# --------------------------------------------------------------------------------------------- fields

def _upsample(low: np.ndarray, f: int, shape: Tuple[int, int]) -> np.ndarray:
    """Bilinear upsample by an integer factor (cell centres aligned, edges clamped), cropped to ``shape``.

    Done as f phase-shifted blends along each axis: ~4x faster than scipy.ndimage.zoom, same values.
    """
    h, w = low.shape
    p = np.pad(low.astype(np.float32, copy=False), 1, mode="edge")
    phases = []
    for r in range(f):
        pos = (r + 0.5) / f - 0.5
        phases.append((r, 0, 1.0 + pos) if pos < 0 else (r, 1, pos))
    cols = np.empty((h + 2, w, f), np.float32)
    for r, lo, t in phases:
        cols[:, :, r] = (1 - t) * p[:, lo:lo + w] + t * p[:, lo + 1:lo + 1 + w]
    cols = cols.reshape(h + 2, w * f)[:, :shape[1]]
    out = np.empty((h, f, cols.shape[1]), np.float32)
    for r, lo, t in phases:
        np.multiply(cols[lo:lo + h], 1 - t, out=out[:, r])
        out[:, r] += t * cols[lo + 1:lo + 1 + h]
    return out.reshape(h * f, -1)[:shape[0]]


def _sample(low: np.ndarray, f: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The values :func:`_upsample` gives at full-resolution rows ``ys`` and columns ``xs``."""
    def weights(pos: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        c = np.clip((pos + 0.5) / f - 0.5, 0, n - 1)
        i0 = np.minimum(np.floor(c).astype(int), max(n - 2, 0))
        return i0, (c - i0).astype(np.float32)

    h, w = low.shape
    i0, ty = weights(np.asarray(ys, float), h)
    j0, tx = weights(np.asarray(xs, float), w)
    i1, j1 = np.minimum(i0 + 1, h - 1), np.minimum(j0 + 1, w - 1)
    rows = low[i0] * (1 - ty)[:, None] + low[i1] * ty[:, None]
    return rows[:, j0] * (1 - tx) + rows[:, j1] * tx


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation (periodic, so no edge artefacts)."""
    spectrum = ndi.fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma, n=shape[1])
    n = np.fft.irfft2(spectrum, s=shape).astype(np.float32)  # FFT: large sigmas cost no more than small ones
    return n / max(float(n.std()), 1e-6)


def _signed_distance(field: np.ndarray, grid: int) -> np.ndarray:
    """First-order signed distance (full-resolution pixels) to the zero level set of a coarse field."""
    gy, gx = np.gradient(field)
    slope = np.maximum(np.hypot(gy, gx), 0.01 * float(np.abs(field).std()) + 1e-6)
    return field / slope * grid


def _tissue_field(rng: np.random.Generator, hl: int, wl: int) -> np.ndarray:
    """Coarse signed distance to the tissue edge (> 0 in tissue): a few irregular blobs with holes.

    Coverage is set by thresholding at a quantile, so every slide lands near its drawn target.
    """
    v, u = np.meshgrid((np.arange(hl) + 0.5) / hl, (np.arange(wl) + 0.5) / wl, indexing="ij")
    blobs = np.zeros((hl, wl), np.float32)
    for _ in range(int(rng.integers(2, 4))):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        a, b = rng.uniform(0.15, 0.28, 2)
        th = rng.uniform(0, np.pi)
        du, dv = u - cx, v - cy
        q = ((du * np.cos(th) + dv * np.sin(th)) / a) ** 2 + ((-du * np.sin(th) + dv * np.cos(th)) / b) ** 2
        blobs = np.maximum(blobs, np.exp(-0.5 * q))
    side = max(hl, wl)
    f = blobs + 0.22 * _smooth_noise(rng, (hl, wl), side / 18) + 0.04 * _smooth_noise(rng, (hl, wl), side / 70)
    edge = np.minimum(np.minimum(u, 1 - u), np.minimum(v, 1 - v))
    f = f * np.clip(edge / 0.07, 0, 1) - 2.0 * (edge < 0.015)  # glass all round the section
    f = f - np.quantile(f, 1 - rng.uniform(0.44, 0.6))
    # Holes: the top few percent of a mid-scale noise field inside the tissue (a handful of tears/lumina).
    holes = _smooth_noise(rng, (hl, wl), max(2.0, side / 36))
    q = np.quantile(holes[f > 0], 1 - rng.uniform(0.025, 0.06)) if (f > 0).any() else np.inf
    f = np.minimum(f, 0.35 * (q - holes))
    return _signed_distance(f, _GRID)


def _class_regions(rng: np.random.Generator, tissue: np.ndarray, required: Sequence[int],
                   pool: Sequence[int], fill: Sequence[int] = ()) -> np.ndarray:
    """One-hot (len(TISSUE_CLASSES), hl, wl) of warped-Voronoi class regions, smoothed for soft boundaries.

    The largest tissue cells go to the required classes, then one to each other pooled class,
    so the planned classes are present whatever the random geometry. Cells beyond those draw from
    ``fill`` (default: the pool), so a class kept out of it (a rare tumour focus) stays one small cell.
    """
    hl, wl = tissue.shape
    inside = np.flatnonzero(tissue > 0)
    if inside.size == 0:
        inside = np.arange(hl * wl)
    cand = rng.choice(inside, size=min(256, inside.size), replace=False)
    cy, cx = np.divmod(cand, wl)
    n_cells = int(rng.integers(4, 7))
    seeds = [int(rng.integers(cand.size))]
    dmin = np.hypot(cy - cy[seeds[0]], cx - cx[seeds[0]])
    for _ in range(n_cells - 1):  # farthest-point sampling spreads the cells over the tissue
        seeds.append(int(np.argmax(dmin)))
        dmin = np.minimum(dmin, np.hypot(cy - cy[seeds[-1]], cx - cx[seeds[-1]]))
    yy, xx = np.mgrid[0:hl, 0:wl].astype(np.float32)
    amp = 0.09 * max(hl, wl)
    wy = yy + amp * _smooth_noise(rng, (hl, wl), max(hl, wl) / 12)
    wx = xx + amp * _smooth_noise(rng, (hl, wl), max(hl, wl) / 12)
    d = np.stack([(wy - cy[s]) ** 2 + (wx - cx[s]) ** 2 for s in seeds])
    cell = np.argmin(d, axis=0)
    area = np.bincount(cell[tissue > 0], minlength=len(seeds))
    order = np.argsort(-area, kind="stable")
    first = list(dict.fromkeys(list(required) + list(pool)))
    cls = np.empty(len(seeds), int)
    fill = list(fill) or list(pool)
    for rank, c in enumerate(order):
        cls[c] = first[rank] if rank < len(first) else fill[int(rng.integers(len(fill)))]
    onehot = np.zeros((len(TISSUE_CLASSES), hl, wl), np.float32)
    onehot[cls[cell], yy.astype(int), xx.astype(int)] = 1.0
    return ndi.gaussian_filter(onehot, (0, 1.0, 1.0), mode="nearest")


def _fibre_profile(rng: np.random.Generator, length: int = 4096) -> np.ndarray:
    """Eosin modulation across collagen, one entry per pixel: bundles 3-15 px wide (+) split by thin pale clefts (-)."""
    n = ndi.gaussian_filter1d(rng.standard_normal(length), 1.6, mode="wrap")
    return np.tanh(2.5 * (n / n.std() + 0.55)).astype(np.float32)


# --------------------------------------------------------------------------------------------- nuclei

_Sprite = Tuple[np.ndarray, np.ndarray, np.ndarray]  # (dy, dx, haematoxylin) of the non-zero pixels


def _nucleus(rng: np.random.Generator, a: float, b: float, angle: float, irregular: float, base: float,
             rim: float, nucleoli: int, speckle: float) -> _Sprite:
    """One nucleus: a (possibly lobulated) ellipse with an anti-aliased edge, chromatin speckle,
    a darker membrane rim and nucleoli, as haematoxylin concentration."""
    r = int(np.ceil(max(a, b) * (1 + irregular) + 2))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    uu = dx * np.cos(angle) + dy * np.sin(angle)
    vv = -dx * np.sin(angle) + dy * np.cos(angle)
    phi = np.arctan2(vv / b, uu / a)
    wobble = np.ones_like(phi)
    for m, weight in ((2, 1.0), (3, 0.6), (5, 0.25)):
        wobble += weight * irregular * rng.uniform(-1, 1) * np.cos(m * phi + rng.uniform(0, 2 * np.pi))
    rho = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / np.maximum(wobble, 0.3)
    inside = np.clip((1 - rho) * min(a, b) + 0.5, 0, 1)
    grain = ndi.gaussian_filter(rng.standard_normal(dy.shape), 0.8)
    val = base + rim * np.exp(-(((rho - 0.85) / 0.15) ** 2)) + speckle * grain / max(grain.std(), 1e-6)
    for _ in range(nucleoli):
        ny, nx = rng.uniform(-0.4, 0.4, 2) * min(a, b)
        val += 0.7 * np.exp(-((dy - ny) ** 2 + (dx - nx) ** 2) / (2 * 1.4 ** 2))
    val = np.clip(val, 0, None) * inside
    keep = val > 0.01
    return dy[keep].astype(int), dx[keep].astype(int), val[keep].astype(np.float32)


def _sprite_banks(rng: np.random.Generator) -> Dict[str, List[_Sprite]]:
    """Per-slide nucleus shapes; each nucleus picks one, so a slide shows a varied but consistent population."""
    banks: Dict[str, List[_Sprite]] = {"lymph": [], "tumor": [], "spindle": [], "fragment": [], "ghost": []}
    for _ in range(24):  # lymphocytes: small, round, uniformly dark
        a = rng.uniform(5.5, 7.5)
        banks["lymph"].append(_nucleus(rng, a, a * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 0.04,
                                       rng.uniform(1.15, 1.45), 0.1, 0, 0.12))
    for _ in range(48):  # tumour: large, pleomorphic, vesicular, with nucleoli
        a = rng.uniform(9.0, 16.0)
        banks["tumor"].append(_nucleus(rng, a, a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi),
                                       rng.uniform(0.05, 0.16), rng.uniform(0.4, 0.65), rng.uniform(0.2, 0.45),
                                       int(rng.integers(1, 3)), 0.2))
    for k in range(48):  # fibroblasts: thin spindles, 16 orientation bins x 3 variants
        banks["spindle"].append(_nucleus(rng, rng.uniform(9.0, 15.0), rng.uniform(2.0, 3.2), (k % 16) * np.pi / 16,
                                         0.05, rng.uniform(0.8, 1.0), 0.05, 0, 0.08))
    for _ in range(24):  # necrosis: karyorrhectic fragments and faint ghost nuclei
        a = rng.uniform(1.3, 3.6)
        banks["fragment"].append(_nucleus(rng, a, a * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), 0.3,
                                          rng.uniform(0.9, 1.4), 0.0, 0, 0.1))
        g = rng.uniform(7.0, 11.0)
        banks["ghost"].append(_nucleus(rng, g, g * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 0.08,
                                       rng.uniform(0.1, 0.18), 0.08, 0, 0.04))
    return banks


def _atypia_banks(rng: np.random.Generator) -> Tuple[List[_Sprite], List[_Sprite]]:
    """(malignant, benign) nuclei of an epithelial focus whose slide label is its atypia, not its colour.

    Malignant nuclei are pleomorphic (sizes vary 2.4x, elongated, lobulated contours, nucleoli, coarse
    chromatin); benign ones are uniform, round and smooth. Both banks have the same mean nuclear area and
    the same total haematoxylin (the benign bank is rescaled to it), so a focus's mean colour, darkness
    and nuclear density do not tell the two apart: only nuclear shape and size variation do. Both are
    drawn on every slide, so a slide's label changes nothing but its focus's nuclei."""
    mal: List[_Sprite] = []
    ben: List[_Sprite] = []
    for _ in range(48):
        a = rng.uniform(7.0, 17.0)
        mal.append(_nucleus(rng, a, a * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), rng.uniform(0.15, 0.3),
                            rng.uniform(0.45, 0.6), rng.uniform(0.2, 0.4), int(rng.integers(1, 4)), 0.25))
        b = rng.uniform(10.4, 11.4)
        ben.append(_nucleus(rng, b, b * rng.uniform(0.88, 1.0), rng.uniform(0, np.pi), 0.03,
                            0.55, 0.08, 0, 0.1))
    k = sum(float(v.sum()) for *_, v in mal) / sum(float(v.sum()) for *_, v in ben)
    return mal, [(dy, dx, (v * k).astype(np.float32)) for dy, dx, v in ben]


def _place(rng: np.random.Generator, labels: np.ndarray, cls: int, shape: Tuple[int, int], spacing: float,
           jitter: float, keep: float) -> Tuple[np.ndarray, np.ndarray]:
    """Nucleus centres on a jittered grid (jitter 0.5 ~ Poisson-like), kept where the coarse label is ``cls``."""
    h, w = shape
    gy, gx = np.meshgrid(np.arange(spacing / 2, h, spacing), np.arange(spacing / 2, w, spacing), indexing="ij")
    y = (gy + rng.uniform(-jitter, jitter, gy.shape) * spacing).ravel()
    x = (gx + rng.uniform(-jitter, jitter, gx.shape) * spacing).ravel()
    ok = (y >= 0) & (y < h) & (x >= 0) & (x < w) & (rng.random(y.shape) < keep)
    y, x = y[ok].astype(int), x[ok].astype(int)
    hit = labels[y // _GRID, x // _GRID] == cls + 1
    return y[hit], x[hit]


def _stamp(shape: Tuple[int, int], groups: Sequence[Tuple[np.ndarray, np.ndarray,
           np.ndarray, List[_Sprite]]]) -> np.ndarray:
    """Sum sprites at their centres into a haematoxylin image in one bincount (overlaps darken, as in tissue).

    Each group is (ys, xs, sprite ids, bank). The canvas is padded so sprites at the border need no clipping.
    """
    h, w = shape
    pad = 1 + max((int(np.abs(np.concatenate([dy, dx])).max()) for *_, bank in groups for dy, dx, _ in bank), default=0)
    wp = w + 2 * pad
    idx: List[np.ndarray] = []
    val: List[np.ndarray] = []
    for ys, xs, ids, bank in groups:
        centre = (ys + pad) * wp + (xs + pad)
        for s in np.unique(ids):
            dy, dx, v = bank[s]
            c = centre[ids == s]
            idx.append((c[:, None] + (dy * wp + dx)[None, :]).ravel())
            val.append(np.broadcast_to(v, (c.size, v.size)).ravel())
    if not idx:
        return np.zeros(shape, np.float32)
    acc = np.bincount(np.concatenate(idx), np.concatenate(val), minlength=(h + 2 * pad) * wp)
    return acc.reshape(h + 2 * pad, wp)[pad:pad + h, pad:pad + w].astype(np.float32)


# --------------------------------------------------------------------------------------------- slide rendering

def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _render(rng: np.random.Generator, size: int, required: Sequence[int], pool: Sequence[int],
            mask_downsample: int, fill: Sequence[int] = (),
            stain_shift: Tuple[np.ndarray, np.ndarray, float] = None,
            atypia: "bool | None" = None) -> Tuple[np.ndarray, np.ndarray]:
    """One slide: RGB uint8 (size, size, 3) and its class mask at 1/mask_downsample.

    ``stain_shift``: (haematoxylin offset, eosin offset, strength factor) of the slide's hospital,
    added to the per-slide stain after it is drawn (so the random stream is the same). ``atypia``:
    None draws the tumour class's usual nuclei; True / False the malignant / benign nuclei of
    :func:`_atypia_banks` (both banks drawn either way, so nothing else on the slide changes)."""
    h = w = size
    hl, wl = -(-h // _GRID), -(-w // _GRID)
    dist = _tissue_field(rng, hl, wl)
    soft = _class_regions(rng, dist, required, pool, fill)
    labels = np.where(dist > 0, np.argmax(soft, axis=0) + 1, MASK_BACKGROUND).astype(np.uint8)
    stain = _slide_stain(rng, stain_shift)
    hem, eos = _ground_substance(rng, soft, (h, w))
    fibre_dir = _texture(rng, labels, soft, eos, (h, w))
    hem += _stamp((h, w), _nuclei(rng, labels, fibre_dir, (h, w), atypia))
    rgb = _to_rgb(rng, hem, eos, dist, stain, (h, w))
    return rgb, _class_mask(dist, soft, mask_downsample, (h, w))


def _slide_stain(rng: np.random.Generator, stain_shift) -> tuple:
    """Per-slide stain: vectors and strengths drift between "hospitals"; glass tone too."""
    v_h = _unit(_H_VECTOR + rng.normal(0, 0.07, 3).clip(-0.15, 0.15))
    v_e = _unit(_E_VECTOR + rng.normal(0, 0.07, 3).clip(-0.15, 0.15))
    s_h, s_e = np.exp(rng.normal(0, 0.28, 2).clip(-0.6, 0.6))
    glass = 242.0 * np.exp(-rng.uniform(0.0, 0.025, 3))
    if stain_shift is not None:
        v_h, v_e = _unit(v_h + stain_shift[0]), _unit(v_e + stain_shift[1])
        s_h, s_e = s_h * stain_shift[2], s_e * stain_shift[2]
    return v_h, v_e, s_h, s_e, glass


def _ground_substance(rng: np.random.Generator, soft: np.ndarray, shape: Tuple[int, int]) -> tuple:
    """Haematoxylin and eosin of the ground substance, on the coarse grid with slow variation in each stain."""
    h, w = shape
    hl, wl = soft.shape[1:]
    c_h = np.zeros((hl, wl), np.float32)
    c_e = np.zeros((hl, wl), np.float32)
    for c, (bh, be) in _BASE_STAIN.items():
        c_h += soft[c] * bh
        c_e += soft[c] * be
    side = max(hl, wl)
    c_h *= 1 + 0.15 * _smooth_noise(rng, (hl, wl), side / 16)
    c_e *= 1 + 0.12 * _smooth_noise(rng, (hl, wl), side / 16)
    return _upsample(c_h, _GRID, (h, w)), _upsample(c_e, _GRID, (h, w))


def _texture(rng: np.random.Generator, labels: np.ndarray, soft: np.ndarray, eos: np.ndarray,
             shape: Tuple[int, int]) -> tuple | None:
    """Fine granularity everywhere (strong in necrosis) and stroma's collagen, added to ``eos`` in place;
    returns the direction across the fibres (None without stroma)."""
    h, w = shape
    hl, wl = soft.shape[1:]
    # noise at half resolution, upsampled
    grain = _upsample(rng.standard_normal((-(-h // 2), -(-w // 2))).astype(np.float32), 2, (h, w))
    eos *= 1 + 0.08 * grain
    fibre_dir = None
    if (labels == _NECROSIS + 1).any():
        eos += _upsample(0.16 * soft[_NECROSIS], _GRID, (h, w)) * np.clip(grain, -1.5, 1.5)
    if (labels == _STROMA + 1).any():
        # Collagen: bundles of varied width along the level sets of a gently warped coordinate
        # across the fibres (a random 1-D profile, indexed by that coordinate in pixels).
        th = rng.uniform(0, np.pi)
        warp = _smooth_noise(rng, (hl, wl), 480 / _GRID)
        gwy, gwx = np.gradient(warp)
        amp = 0.4 * _GRID / max(float(np.sqrt(np.mean(gwy ** 2 + gwx ** 2))), 1e-6)  # fibres swing ~20-40 deg
        across = _upsample(amp * warp, _GRID, (h, w))
        across += (np.cos(th) * np.arange(w, dtype=np.float32))[None, :]
        across += (np.sin(th) * np.arange(h, dtype=np.float32))[:, None]
        profile = _fibre_profile(rng)
        fib = profile[np.mod(across.astype(np.int32), profile.size)]  # = np.take(mode="wrap"), whose wrap loops per element
        eos += _upsample(0.32 * soft[_STROMA], _GRID, (h, w)) * fib
        fibre_dir = (np.sin(th) + amp * gwy / _GRID, np.cos(th) + amp * gwx / _GRID)  # gradient of `across`
    return fibre_dir


def _nuclei(rng: np.random.Generator, labels: np.ndarray, fibre_dir: tuple | None,
            shape: Tuple[int, int], atypia: "bool | None" = None) -> list:
    """Nuclei: positions per class region, shapes from this slide's sprite banks (groups for :func:`_stamp`);
    ``atypia``: as :func:`_render`'s."""
    h, w = shape
    banks = _sprite_banks(rng)
    if atypia is not None:
        banks["tumor"] = _atypia_banks(rng)[0 if atypia else 1]
    groups = []
    ly, lx = _place(rng, labels, _LYMPH, (h, w), rng.uniform(15.5, 18.0), 0.3, 0.93)
    groups.append((ly, lx, rng.integers(len(banks["lymph"]), size=ly.size), banks["lymph"]))
    ty, tx = _place(rng, labels, _TUMOR, (h, w), rng.uniform(25.0, 29.0), 0.3, 0.92)
    groups.append((ty, tx, rng.integers(len(banks["tumor"]), size=ty.size), banks["tumor"]))
    if fibre_dir is not None:
        sy, sx = _place(rng, labels, _STROMA, (h, w), 52.0, 0.5, 0.9)
        gy, gx = fibre_dir[0][sy // _GRID, sx // _GRID], fibre_dir[1][sy // _GRID, sx // _GRID]
        along = np.arctan2(gy, gx) + np.pi / 2  # fibres run perpendicular to the gradient of `across`
        bins = np.round(np.mod(along, np.pi) / (np.pi / 16)).astype(int) % 16
        groups.append((sy, sx, bins + 16 * rng.integers(3, size=sy.size), banks["spindle"]))
    fy, fx = _place(rng, labels, _NECROSIS, (h, w), 17.0, 0.5, 0.8)
    groups.append((fy, fx, rng.integers(len(banks["fragment"]), size=fy.size), banks["fragment"]))
    gy, gx = _place(rng, labels, _NECROSIS, (h, w), 48.0, 0.5, 0.7)
    groups.append((gy, gx, rng.integers(len(banks["ghost"]), size=gy.size), banks["ghost"]))
    return groups


def _to_rgb(rng: np.random.Generator, hem: np.ndarray, eos: np.ndarray, dist: np.ndarray, stain: tuple,
            shape: Tuple[int, int]) -> np.ndarray:
    """Tissue edge anti-aliased over ~2 px; Beer-Lambert to RGB plus a little sensor noise. Done in
    row blocks that stay in cache: ~4x faster than whole-image passes."""
    h, w = shape
    v_h, v_e, s_h, s_e, glass = stain
    tissue = np.clip(0.5 + 0.5 * _upsample(dist, _GRID, (h, w)), 0, 1)
    noise = rng.integers(-3, 4, size=(h, w), dtype=np.int8)
    absorb_h, absorb_e = (-s_h * v_h).astype(np.float32), (-s_e * v_e).astype(np.float32)
    rgb = np.empty((h, w, 3), np.uint8)
    step = 32
    buf, hb, eb = (np.empty((step, w), np.float32) for _ in range(3))
    for r0 in range(0, h, step):
        rows = slice(r0, min(r0 + step, h))
        n = rows.stop - r0
        np.multiply(hem[rows], tissue[rows], out=hb[:n])
        np.multiply(eos[rows], tissue[rows], out=eb[:n])
        for ch in range(3):
            od = np.multiply(hb[:n], absorb_h[ch], out=buf[:n])
            od += eb[:n] * absorb_e[ch]
            np.exp(od, out=od)
            od *= glass[ch]
            od += noise[rows]
            np.clip(od, 0, 255, out=od)
            rgb[rows, :, ch] = od
    return rgb


def _class_mask(dist: np.ndarray, soft: np.ndarray, md: int, shape: Tuple[int, int]) -> np.ndarray:
    """The class of each mask pixel (1/md of the slide), sampled at its centre."""
    h, w = shape
    centres_y = np.arange(-(-h // md)) * md + (md - 1) / 2
    centres_x = np.arange(-(-w // md)) * md + (md - 1) / 2
    in_tissue = _sample(dist, _GRID, np.minimum(centres_y, h - 1), np.minimum(centres_x, w - 1)) > 0
    cls = np.argmax(np.stack([_sample(s, _GRID, np.minimum(centres_y, h - 1), np.minimum(centres_x, w - 1))
                              for s in soft]), axis=0)
    return np.where(in_tissue, cls + 1, MASK_BACKGROUND).astype(np.uint8)


# --------------------------------------------------------------------------------------------- slide sets

@dataclass(frozen=True)
class SlideInfo:
    slide_id: str
    path: Path
    mask_path: Path
    width: int
    height: int
    classes_present: Tuple[str, ...]


def _class_plan(rng: np.random.Generator, n_slides: int) -> List[Tuple[List[int], List[int]]]:
    """(required, pool) classes per slide: slide i must show classes i and i+1 (mod the class count),
    so with >= 2 slides per class in rotation every class appears at least twice; a few extras at random."""
    k = len(TISSUE_CLASSES)
    plan = []
    for i in range(n_slides):
        required = [i % k, (i + 1) % k]
        others = [c for c in range(k) if c not in required]
        extra = [int(c) for c in rng.permutation(others)[:int(rng.choice([0, 1, 1, 2]))]]
        plan.append((required, required + extra))
    return plan


def _write_png(path: Path, mask: np.ndarray) -> None:
    """Single-channel 8-bit PNG of class ids, written atomically."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        Image.fromarray(mask, mode="L").save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class LabelPlan:
    """Slide labels for weakly supervised learning (``task: mil``): a slide is ``tumour`` when it holds a
    tumour focus (one of its smaller class regions, a minority of its tiles) and ``normal`` when it holds
    none, so no single tile's texture average decides it and a model must find the focus. Slide i comes
    from hospital ``i % hospitals``; each hospital has its own share of tumour slides (``prevalence``,
    cycled) and its own stain shift (haematoxylin/eosin direction and strength), as between real labs.

    ``pattern``: ``focus`` as above (the focus's large dark nuclei alone tell a tumour slide, even to a
    random encoder); ``atypia``: EVERY slide holds an epithelial focus of the same size plan (the mask's
    tumor class) and the label is its nuclei's atypia alone (:func:`_atypia_banks`: pleomorphic vs uniform
    nuclei of equal mean area and haematoxylin), so colour, darkness, nuclear density and the focus's
    size are the same for both labels and only features that see nuclear shape separate them."""

    hospitals: int = 2
    prevalence: Tuple[float, ...] = (0.35, 0.65)
    stain_shift: float = 0.1
    pattern: str = "focus"

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"slide label pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")

    def hospital_name(self, h: int) -> str:
        return f"hospital-{chr(ord('a') + h)}" if h < 26 else f"hospital-{h}"

    def assign(self, seed: int, n_slides: int) -> List[Tuple[int, bool]]:
        """(hospital, tumour?) per slide: each hospital gets round(prevalence * its slides) tumour slides
        (at least one of each label where it has two slides or more), placed by a seeded shuffle."""
        out: List[Tuple[int, bool]] = [(i % self.hospitals, False) for i in range(n_slides)]
        for h in range(self.hospitals):
            mine = list(range(h, n_slides, self.hospitals))
            p = self.prevalence[h % len(self.prevalence)]
            k = int(round(p * len(mine)))
            if len(mine) >= 2:
                k = min(max(k, 1), len(mine) - 1)
            for i in np.random.default_rng([seed, 1 << 29, h]).permutation(mine)[:k]:
                out[int(i)] = (h, True)
        return out

    def shift(self, seed: int, h: int) -> Tuple[np.ndarray, np.ndarray, float]:
        rng = np.random.default_rng([seed, 1 << 28, h])
        s = self.stain_shift
        return rng.normal(0, s, 3), rng.normal(0, s, 3), float(np.exp(rng.normal(0, s)))


def _labelled_plan(i: int, tumour: bool, focus_always: bool = False) -> Tuple[List[int], List[int], List[int]]:
    """(required, pool, fill) of slide i: every non-tumour class (rotating which two are required, the two
    largest regions), and tumour only on tumour slides, as the third largest region (a minority of the
    tissue, 10-25%); further regions never draw tumour. ``focus_always`` (pattern atypia): the focus on
    every slide, as the second largest region (20-40% of the tissue), the label being its nuclei's."""
    normal = [_STROMA, _LYMPH, _NECROSIS]
    if focus_always:
        required = [normal[i % 3], _TUMOR]
        return required, required + [normal[(i + 1) % 3], normal[(i + 2) % 3]], normal
    required = [normal[i % 3], normal[(i + 1) % 3]]
    pool = required + ([_TUMOR] if tumour else []) + [normal[(i + 2) % 3]]
    return required, pool, normal


def write_labels_csv(path: Path, rows: Sequence[Tuple[str, str, str]]) -> None:
    """``slide_id,label,site`` (the format ``data.bags.labels`` reads), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("slide_id,label,site\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    os.replace(tmp, path)


def synthesize_slides(out_dir, n_slides: int = 8, size: int = 4096, seed: int = 0, tile: int = 256,
                      mask_downsample: int = 8, progress: bool = True,
                      labels: "LabelPlan | None" = None) -> List[SlideInfo]:
    """Write ``slide-000.tiff`` ... with ``slide-000.mask.png`` masks and a ``slides.json`` manifest.

    Masks are uint8 at 1/mask_downsample (0 = background, i + 1 = TISSUE_CLASSES[i]). A slide's image
    depends only on (seed, slide index, size), so a rerun, or a run with more slides, reproduces it
    bit for bit. Existing files of the same names are replaced. ``progress``: a bar on a terminal,
    plain lines on stderr otherwise (hpcfl.console). ``labels``: slides with slide-level labels
    from several hospitals (:class:`LabelPlan`), also written to ``labels.csv``.
    """
    if n_slides < 1 or size < 4 * _GRID or mask_downsample < 1 or seed < 0:
        raise ValueError(f"need n_slides >= 1, size >= {4 * _GRID}, mask_downsample >= 1, seed >= 0 "
                         f"(got {n_slides}, {size}, {mask_downsample}, {seed})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _class_plan(np.random.default_rng([seed, 1 << 30]), n_slides)
    assigned = labels.assign(seed, n_slides) if labels is not None else []
    infos: List[SlideInfo] = []
    if progress:
        from ..console import progress_iter

        plan = progress_iter(plan, "synthesizing slides", "slide")
    for i, (required, pool) in enumerate(plan):
        fill, shift = (), None
        if labels is not None:
            atypia = labels.pattern == "atypia"
            required, pool, fill = _labelled_plan(i, assigned[i][1], atypia)
            shift = labels.shift(seed, assigned[i][0])
        rgb, mask = _render(np.random.default_rng([seed, i]), size, required, pool, mask_downsample, fill, shift,
                            assigned[i][1] if labels is not None and atypia else None)
        slide_id = f"slide-{i:03d}"
        path, mask_path = out / f"{slide_id}.tiff", out / f"{slide_id}.mask.png"
        write_pyramid(path, rgb, tile=tile)
        _write_png(mask_path, mask)
        present = tuple(TISSUE_CLASSES[c - 1] for c in np.unique(mask) if c != MASK_BACKGROUND)
        infos.append(SlideInfo(slide_id, path, mask_path, size, size, present))
    manifest = {
        "classes": list(TISSUE_CLASSES), "mask_downsample": mask_downsample, "tile": tile, "seed": seed,
        "slides": [{"slide_id": s.slide_id, "file": s.path.name, "mask": s.mask_path.name, "width": s.width,
                    "height": s.height, "classes_present": list(s.classes_present)} for s in infos],
    }
    if labels is not None:
        manifest["labels"] = {"hospitals": labels.hospitals, "prevalence": list(labels.prevalence),
                              "stain_shift": labels.stain_shift, "file": "labels.csv",
                              **({"pattern": labels.pattern} if labels.pattern != "focus" else {})}
        write_labels_csv(out / "labels.csv", [(s.slide_id, "tumour" if t else "normal", labels.hospital_name(h))
                                              for s, (h, t) in zip(infos, assigned)])
    tmp = out / f".slides.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "slides.json")
    return infos
