"""Make a config's tile data ready: synthesize slides if asked and absent, tile them if the index is stale.

Idempotent and run once per job (by rank 0 before any site rank reads the
index, or by hand with ``hpcfl synth-slides`` and ``hpcfl tile``).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import HpcflError
from .tiling import TILING_VERSION, TilingParams, list_slides, tile_directory


def tiling_params(cfg) -> TilingParams:
    from .arrays import resolved_name

    t = cfg.data.tiles
    return TilingParams(level=t.level, tile_size=t.tile_size, stride=t.stride or t.tile_size, backend=t.backend,
                        array_backend=resolved_name(cfg.data.array_backend))


def stale_synthesis(slides_dir: Path, want) -> str:
    """What ``slides_dir`` holds, when hpcfl synthesized it (its slides.json) with other settings than
    ``want`` (data.tiles.synthesize); "" when it matches, was not synthesized, or holds nothing."""
    meta = slides_dir / "slides.json"
    try:
        got = json.loads(meta.read_text())
        slides = got["slides"]
        have = (len(slides), int(slides[0]["width"]) if slides else 0, int(got["seed"]))
        labels = got.get("labels")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""
    plan = label_plan(want)
    asked = None if plan is None else {"hospitals": plan.hospitals, "prevalence": list(plan.prevalence),
                                       "stain_shift": plan.stain_shift, "file": "labels.csv",
                                       **({"pattern": plan.pattern} if plan.pattern != "focus" else {})}
    if have == (want.slides, want.size, want.seed) and labels == asked:
        return ""
    kind = f" labelled ({labels.get('hospitals')} hospitals)" if isinstance(labels, dict) else ""
    return f"{have[0]}{kind} synthesized slides of {have[1]} px, seed {have[2]}"


def label_plan(s):
    """The LabelPlan of data.tiles.synthesize (None: slides without slide labels)."""
    if not getattr(s, "hospitals", 0):
        return None
    from .synth import LabelPlan

    return LabelPlan(s.hospitals, tuple(s.prevalence), s.stain_shift, s.pattern)


def _drop_synthesis(slides_dir: Path) -> None:
    """Remove the slides (and masks) that slides.json lists, then slides.json: nothing else in the folder."""
    meta = slides_dir / "slides.json"
    got = json.loads(meta.read_text())
    for s in got["slides"]:
        for key in ("file", "mask"):
            name = s.get(key)
            if isinstance(name, str) and "/" not in name:
                (slides_dir / name).unlink(missing_ok=True)
    if isinstance(got.get("labels"), dict):
        (slides_dir / "labels.csv").unlink(missing_ok=True)
    meta.unlink()


def prepare_for_run(cfg) -> Path:
    """Rank 0 of a run, before any site rank starts: the tile index every site reads, built once (quietly),
    and a warning for a tile cache that can serve wrong tiles."""
    t = cfg.data.tiles
    if t.backend == "cucim" and t.cache.type == "per_process":
        sys.stderr.write("hpcfl: warning: data.tiles.cache.type: per_process can serve another slide's "
                         "tile at the same position with cuCIM 26.10 (rapidsai/cucim#1108); "
                         "shared_memory (the default) or nocache cannot\n")
    return prepare_tiles(cfg, progress=False)


def prepare_tiles(cfg, progress: bool = True) -> Path:
    t = cfg.data.tiles
    slides_dir, index_dir = Path(t.slides_dir), Path(t.index_dir)
    if t.synthesize is not None:
        # e.g. a config (the quickstart's) that now synthesizes 16 slides where 8 were made before:
        # training on the old ones would be silent and wrong
        old = stale_synthesis(slides_dir, t.synthesize)
        if old:
            s = t.synthesize
            print(f"hpcfl: {slides_dir} holds {old}; data.tiles.synthesize asks for {s.slides} of {s.size} px, "
                  f"seed {s.seed}: synthesizing them again", file=sys.stderr, flush=True)
            _drop_synthesis(slides_dir)
            (index_dir / "index.json").unlink(missing_ok=True)  # same slide paths, new pixels and masks: retile
    have = slides_dir.is_dir() and list_slides(slides_dir)
    if not have:
        if t.synthesize is None:
            raise HpcflError(f"data.tiles.slides_dir: {slides_dir} holds no slides (.svs, .tif, .tiff); "
                             "point it at your slides or set data.tiles.synthesize")
        from .synth import synthesize_slides

        s = t.synthesize
        synthesize_slides(slides_dir, n_slides=s.slides, size=s.size, seed=s.seed, labels=label_plan(s))
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
