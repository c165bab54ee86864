"""Make a config's tile data ready: synthesize slides if asked and absent, tile them if the index is stale.

Idempotent and run once per job (by rank 0 before any site rank reads the
index, or by hand with ``hpcfl synth-slides`` and ``hpcfl tile``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..errors import HpcflError
from .tiling import TILING_VERSION, TilingParams, list_slides, tile_directory


def tiling_params(cfg) -> TilingParams:
    from .arrays import resolved_name

    t = cfg.data.tiles
    return TilingParams(level=t.level, tile_size=t.tile_size, stride=t.stride or t.tile_size, backend=t.backend,
                        array_backend=resolved_name(cfg.data.array_backend))


def prepare_tiles(cfg, progress: bool = True) -> Path:
    t = cfg.data.tiles
    slides_dir, index_dir = Path(t.slides_dir), Path(t.index_dir)
    have = slides_dir.is_dir() and list_slides(slides_dir)
    if not have:
        if t.synthesize is None:
            raise HpcflError(f"data.tiles.slides_dir: {slides_dir} holds no slides (.svs, .tif, .tiff); "
                             "point it at your slides or set data.tiles.synthesize")
        from .synth import synthesize_slides

        s = t.synthesize
        synthesize_slides(slides_dir, n_slides=s.slides, size=s.size, seed=s.seed)
    params = tiling_params(cfg)
    meta = index_dir / "index.json"
    slides = sorted(str(p.resolve()) for p in list_slides(slides_dir))
    if meta.exists():
        old = json.loads(meta.read_text())
        done = sorted([s["path"] for s in old.get("slides", [])] + [f.split(":")[0] for f in old.get("failures", [])])
        if old.get("version") == TILING_VERSION and old.get("params") == asdict(params) and done == slides:
            return index_dir
    _, failures = tile_directory(slides_dir, index_dir, params, progress=progress)
    if failures:
        raise HpcflError(f"tiling {slides_dir}: {len(failures)} slide(s) failed, first: {failures[0]}")
    return index_dir
