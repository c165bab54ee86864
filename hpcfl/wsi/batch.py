"""Whole-batch tile math: resize, crops, flips/rotations, float conversion, in a few array ops per batch.

Every function takes the array module ``xp`` (NumPy, or CuPy on a GPU): the
same code assembles a batch on the host or on the device. Random decisions
(which of the 8 flips/90-degree rotations, where a crop sits) come from each
item's seed through a hash, on the host: a batch is the same whatever the
number of loader workers, the batch it falls in, or the device it is built on.

Layout: tiles arrive as decoded, (N, H, W, 3) uint8; a batch leaves as
(N, 3, h, w) float32 in [0, 1], contiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of state ``x + golden``: a well-mixed uint64 per element (vectorised)."""
    z = np.asarray(x).astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def item_draws(seeds: Sequence[int], crops: int) -> np.ndarray:
    """One uint64 per (item, crop), row-major: hash of (hash of the item's seed, crop number)."""
    base = splitmix64(np.asarray(seeds, np.int64).astype(np.uint64))
    return splitmix64(base[:, None] + np.arange(crops, dtype=np.uint64)[None, :]).reshape(-1)


def dihedral_codes(draws: np.ndarray) -> np.ndarray:
    """Which of the 8 flips/rotations (bit 2: transpose, bit 0: flip rows, bit 1: flip columns), uniformly."""
    return (draws & np.uint64(7)).astype(np.int8)


def crop_offsets(draws: np.ndarray, tile: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(row, column) of each crop's top-left corner, uniform over the positions that fit in the tile."""
    span = np.uint64(tile - size + 1)
    return ((draws >> np.uint64(8)) % span).astype(np.int64), ((draws >> np.uint64(32)) % span).astype(np.int64)


def area_bounds(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """[start, end) of every output pixel's window, as torch's adaptive average pooling (and MONAI's
    ``Resize(mode="area")``) define them: floor(i * n_in / n_out) to ceil((i + 1) * n_in / n_out)."""
    i = np.arange(n_out, dtype=np.int64)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def _first_two(xp, part, shortest: int, dtype, out=None):
    """The accumulator of a window sum from its first part(s), widened while adding (one pass, not two);
    returns it and the next offset to add."""
    if shortest >= 2:
        return xp.add(part(0), part(1), out=out, dtype=dtype), 2
    if out is None:
        return part(0).astype(dtype), 1
    out[...] = part(0)
    return out, 1


def _window_sum_rows(xp, x, size: int, dtype):
    """(N, H, W, C) -> (N, size, W, C): sums over the row windows of an area resize to ``size``.

    The windows repeat every p = H / gcd(H, size) rows (q = size / gcd outputs per period): a
    reshape to (N, gcd, p, W * C) makes every row a window needs a strided view, so the sums are
    contiguous adds of whole rows, with no gathered copies.
    """
    n, h, w, c = x.shape
    g = math.gcd(h, size)
    p, q = h // g, size // g
    start, end = area_bounds(p, q)
    v = x.reshape(n, g, p, w * c)
    out = xp.empty((n, g, q, w * c), dtype)
    for r in range(q):
        acc, first = _first_two(xp, lambda d: v[:, :, start[r] + d], int(end[r] - start[r]), dtype, out[:, :, r])
        for d in range(first, int(end[r] - start[r])):
            acc += v[:, :, start[r] + d]
    return out.reshape(n, size, w, c)


def _window_sum_cols(xp, x, start: np.ndarray, end: np.ndarray, dtype):
    """Sum of (N, h, W, C) over column windows [start[j], end[j]), per channel.

    Columns and channels are one contiguous axis of W * C values: a window of L columns is
    the sum of L slices shifted by C, so the work is L contiguous adds and one gather of the
    window starts (a gather of C-value chunks per window offset, as rows get, is several
    times slower).
    """
    n, h, w, c = x.shape
    flat = x.reshape(n, h, w * c)
    length = end - start
    out = xp.empty((n, h, len(start), c), dtype)
    for ln in np.unique(length).tolist():
        sel = np.flatnonzero(length == ln)
        span = (w - ln + 1) * c
        acc, first = _first_two(xp, lambda d: flat[..., d * c:d * c + span], ln, dtype)
        for d in range(first, ln):
            acc += flat[..., d * c:d * c + span]
        v = xp.take(acc, xp.asarray((start[sel][:, None] * c + np.arange(c)).ravel()), axis=2).reshape(n, h, len(sel), c)
        if len(sel) == len(start):
            out[...] = v
        else:
            out[:, :, xp.asarray(sel)] = v
    return out


def window_sums(xp, x, size: int):
    """(N, H, W, C) uint8 -> (N, size, size, C) exact integer sums of each area window (uint16 where
    they fit), and the (size, size) float32 weights 1 / window area that make them means."""
    n, h, w, c = x.shape
    sh, eh = area_bounds(h, size)
    sw, ew = area_bounds(w, size)
    area = int((eh - sh).max()) * int((ew - sw).max())
    rows = _window_sum_rows(xp, x, size, xp.uint16 if int((eh - sh).max()) <= 257 else xp.uint32)
    s = _window_sum_cols(xp, rows, sw, ew, xp.uint16 if 255 * area < 2**16 else xp.uint32)
    return s, (1.0 / np.outer(eh - sh, ew - sw)).astype(np.float32)


def resize_area(xp, x, size: int, scale: float = 1.0):
    """(N, H, W, C) uint8 -> (N, size, size, C) float32: the mean of each area window, times ``scale``
    (``scale = 1/255`` gives values in [0, 1] without a separate pass)."""
    n, h, w, c = x.shape
    if h == size and w == size:
        return x.astype(xp.float32) * xp.float32(scale)
    s, weight = window_sums(xp, x, size)
    return s.astype(xp.float32) * xp.asarray(weight * np.float32(scale))[None, :, :, None]


def crop(xp, x, item: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int):
    """Crops of ``size`` from (N, H, W, C): crop k is x[item[k], rows[k]:+size, cols[k]:+size] (one gather)."""
    r = rows[:, None] + np.arange(size)
    c = cols[:, None] + np.arange(size)
    return x[xp.asarray(item)[:, None, None], xp.asarray(r)[:, :, None], xp.asarray(c)[:, None, :]]


def to_chw(xp, x, codes: np.ndarray, scale: float = 1.0, out=None):
    """(N, h, w, C) -> (N, C, h, w) float32 times ``scale``, each image turned by its dihedral code.

    The flips and the transpose are strided views: each image costs one copy, the layout
    change and the float conversion included, and no pass is spent on them alone.
    """
    n, h, w, c = x.shape
    if out is None:
        out = xp.empty((n, c, h, w), xp.float32)
    codes = np.asarray(codes)
    if h != w and (codes & 4).any():
        raise ValueError("transposing rotations need square images")
    for k, code in enumerate(codes.tolist()):
        v = x[k]
        if code & 4:
            v = v.transpose(1, 0, 2)
        if code & 1:
            v = v[::-1]
        if code & 2:
            v = v[:, ::-1]
        out[k] = v.transpose(2, 0, 1)
    if scale != 1.0:
        out *= xp.float32(scale)
    return out


@dataclass(frozen=True)
class BatchSpec:
    """How tiles become a batch: resize to ``size`` (crops = 1) or cut ``crops`` crops of ``size`` per tile."""

    size: int
    augment: bool = False
    crops: int = 1
    train: bool = True

    @property
    def per_item(self) -> int:
        """Samples each item contributes (evaluation takes one centre crop per tile)."""
        return self.crops if self.train else 1


def assemble(xp, tiles, seeds: Sequence[int], spec: BatchSpec, out=None):
    """(N, T, T, 3) uint8 tiles + one seed per tile -> (N * per_item, 3, size, size) float32 in [0, 1].

    ``out``: an (N * per_item, 3, size, size) float32 buffer to fill (pinned host memory, say).
    """
    n, t = tiles.shape[0], tiles.shape[1]
    if tiles.shape[2] != t:
        raise ValueError(f"tiles must be square, got {tiles.shape[1:3]}")
    k, size = spec.per_item, spec.size
    draws = item_draws(seeds, k)
    codes = dihedral_codes(draws) if spec.augment else np.zeros(n * k, np.int8)
    if spec.crops > 1:
        if spec.train:
            rows, cols = crop_offsets(draws, t, size)
        else:
            rows = cols = np.full(n, (t - size) // 2, np.int64)
        x = crop(xp, tiles, np.repeat(np.arange(n), k), rows, cols, size)
        return to_chw(xp, x, codes, 1.0 / 255.0, out)
    if t == size:
        return to_chw(xp, tiles, codes, 1.0 / 255.0, out)
    s, weight = window_sums(xp, tiles, size)
    out = to_chw(xp, s, codes, 1.0, out)  # integer sums -> float in the same copy
    # The windows of a square tile are the same along both axes and mirror-symmetric
    # (area_bounds), so the weights are unchanged by every flip and rotation: one multiply after.
    out *= xp.asarray(weight * np.float32(1.0 / 255.0))
    return out


def batch_shape(n_items: int, spec: BatchSpec, channels: int = 3) -> Tuple[int, int, int, int]:
    return (n_items * spec.per_item, channels, spec.size, spec.size)
