"""A tiled, JPEG-compressed TIFF from Pillow alone: slides for machines without tifffile/imagecodecs/scipy.

The GPU check runs on a bare machine where every wheel is carried along (64 MiB
in all; imagecodecs alone is 28 MB). This writes what hpcfl.wsi.synth's
``write_pyramid`` writes for level 0 (YCbCr JPEG tiles, 4:2:0, each tile a
complete JPEG stream, no JPEGTables), which cuCIM decodes on the CPU
(libjpeg-turbo) and on the GPU (nvJPEG), and OpenSlide reads too.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np

SHORT, LONG, RATIONAL = 3, 4, 5


def texture(size: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with tissue-like structure at several scales (JPEG does not flatten it)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)  # pixel-level grain
    for cells, amp in ((8, 60), (64, 30), (max(1, size // 8), 12)):
        g = (amp * rng.standard_normal((cells + 1, cells + 1, 3))).astype(np.int16)
        idx = np.minimum(np.arange(size) * cells // size, cells)
        img += g[idx][:, idx]
    img += np.array([200, 120, 170], np.int16)  # pink-purple, like H&E
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg_tiff(path, rgb: np.ndarray, tile: int = 256, quality: int = 90) -> Path:
    """Write RGB uint8 (H, W, 3) as one tiled JPEG TIFF level (atomically); H and W multiples of ``tile``."""
    from PIL import Image

    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or h % tile or w % tile or tile % 16:
        raise ValueError(f"need RGB uint8 with sides that are multiples of the tile ({tile}, a multiple of 16); "
                         f"got {rgb.dtype} {rgb.shape}")
    tiles = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            buf = io.BytesIO()
            Image.fromarray(rgb[y:y + tile, x:x + tile]).save(buf, "JPEG", quality=quality, subsampling=2)
            tiles.append(buf.getvalue())
    n = len(tiles)
    # Layout: header | tile data | out-of-line tag values | IFD
    data_at = 8
    offsets, pos = [], data_at
    for t in tiles:
        offsets.append(pos)
        pos += len(t) + (len(t) & 1)  # word-aligned
    extra = bytearray()

    def out_of_line(fmt: str, values) -> int:
        nonlocal extra
        at = pos + len(extra)
        extra += struct.pack("<" + fmt * len(values), *values)
        if len(extra) & 1:
            extra += b"\0"
        return at

    entries = [
        (256, LONG, 1, w), (257, LONG, 1, h),
        (258, SHORT, 3, out_of_line("H", [8, 8, 8])),
        (259, SHORT, 1, 7),  # JPEG
        (262, SHORT, 1, 6),  # YCbCr
        (277, SHORT, 1, 3), (284, SHORT, 1, 1),
        (322, LONG, 1, tile), (323, LONG, 1, tile),
        (324, LONG, n, out_of_line("I", offsets) if n > 1 else offsets[0]),
        (325, LONG, n, out_of_line("I", [len(t) for t in tiles]) if n > 1 else len(tiles[0])),
        (530, SHORT, 2, 2 | (2 << 16)),  # YCbCrSubSampling 2, 2 (inline: two shorts)
        (532, RATIONAL, 6, out_of_line("I", [0, 1, 255, 1, 128, 1, 255, 1, 128, 1, 255, 1])),
    ]
    ifd_at = pos + len(extra)
    ifd = struct.pack("<H", len(entries))
    for code, typ, count, value in sorted(entries):
        ifd += struct.pack("<HHII", code, typ, count, value)
    ifd += struct.pack("<I", 0)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(b"II*\0" + struct.pack("<I", ifd_at))
        for t in tiles:
            f.write(t + (b"\0" if len(t) & 1 else b""))
        f.write(extra)
        f.write(ifd)
    os.replace(tmp, path)
    return path
