"""The tile index, loaded once per process, and how its slides are split over sites.

Feather files are memory-mapped: the coordinates are read from the page cache
by every rank without copies, and the index is never re-opened per item.
:func:`shared_index` loads it once per process for everyone in it (several
sites simulated in one process share one copy).
Sites own whole slides (a hospital never sees another's slides); train and
validation are split by slide inside each site.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import train_val_split
from ..errors import ConfigError


@dataclass
class TileIndex:
    classes: List[str]
    slide_ids: List[str]  # one per slide, in index order
    slide_paths: List[str]
    slide: np.ndarray  # int32 per tile: index into slide_ids
    x: np.ndarray  # int64, level-0 pixels
    y: np.ndarray
    level: np.ndarray
    size: np.ndarray
    label: np.ndarray  # int16 class id per tile

    def __len__(self) -> int:
        return len(self.x)

    def slide_majority_class(self) -> np.ndarray:
        """Most frequent tile class of every slide (for label-skewed partitions), in one pass."""
        c = len(self.classes)
        counts = np.bincount(self.slide.astype(np.int64) * c + self.label, minlength=len(self.slide_ids) * c)
        return counts.reshape(len(self.slide_ids), c).argmax(axis=1)


def load_index(index_dir, tile_label: str = "tissue", require_class: bool = True) -> TileIndex:
    """Tiles of one label that have a class (any class with ``require_class=False``: a slide without
    annotations has class -1 everywhere), from every slide's Feather file (memory-mapped)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.feather as feather

    d = Path(index_dir)
    meta_path = d / "index.json"
    if not meta_path.exists():
        raise ConfigError(f"{d}: no tile index here (index.json missing); run `hpcfl tile SLIDES_DIR --out {d}`")
    meta = json.loads(meta_path.read_text())
    slide_ids, paths, parts = [], [], []
    for s in meta["slides"]:
        f = d / f"{s['slide_id']}.feather"
        try:
            t = feather.read_table(f, memory_map=True,
                                   columns=["x", "y", "level", "size", "tile_label", "class_id"])
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"{f}: cannot read tile index: {exc}") from None
        keep = pc.equal(t["tile_label"].cast(pa.string()), tile_label)
        if require_class:
            keep = pc.and_(keep, pc.greater_equal(t["class_id"], 0))
        t = t.filter(keep)
        if t.num_rows == 0:
            continue
        slide_ids.append(s["slide_id"])
        paths.append(s["path"])
        parts.append((len(slide_ids) - 1, t))
    if not parts:
        raise ConfigError(f"{d}: no '{tile_label}' tiles{' with a class' if require_class else ''} in the index")
    col = lambda name, dt: np.concatenate([t[name].to_numpy().astype(dt, copy=False) for _, t in parts])
    return TileIndex(
        classes=list(meta["classes"]), slide_ids=slide_ids, slide_paths=paths,
        slide=np.concatenate([np.full(t.num_rows, i, np.int32) for i, t in parts]),
        x=col("x", np.int64), y=col("y", np.int64), level=col("level", np.int16), size=col("size", np.int32),
        label=col("class_id", np.int16),
    )


_SHARED: Dict[Tuple[str, str], Tuple[int, TileIndex]] = {}


def shared_index(index_dir, tile_label: str = "tissue") -> TileIndex:
    """:func:`load_index`, once per process and index (reloaded when index.json changes). Read-only."""
    d = Path(index_dir).resolve()
    try:
        stamp = (d / "index.json").stat().st_mtime_ns
    except OSError:
        return load_index(d, tile_label)  # names the problem
    key = (str(d), tile_label)
    hit = _SHARED.get(key)
    if hit is None or hit[0] != stamp:
        ix = load_index(d, tile_label)
        for a in (ix.slide, ix.x, ix.y, ix.level, ix.size, ix.label):
            a.setflags(write=False)
        _SHARED[key] = hit = (stamp, ix)
    return hit[1]


def partition_slides(n_slides: int, n_sites: int, how: str, seed: int, alpha: float = 0.5,
                     slide_class: Sequence[int] = (), min_per_site: int = 2) -> List[np.ndarray]:
    """Which slides each site owns (disjoint, covering all slides).

    ``slide``: a seeded shuffle dealt round-robin (near-equal counts);
    ``dirichlet``: label skew: slides of each majority class go to sites with
    Dir(alpha) probabilities; ``quantity``: site sizes drawn from Dir(alpha).
    Each site gets at least ``min_per_site`` slides (training and validation are
    split by slide).
    """
    if n_slides < n_sites * min_per_site:
        raise ConfigError(f"data.tiles: {n_slides} slides cannot give {n_sites} sites {min_per_site} slides each "
                          "(a site needs one to train on and one to validate on)")
    rng = np.random.default_rng([seed, 31])
    if how == "slide":
        perm = rng.permutation(n_slides)
        return [np.sort(perm[i::n_sites]) for i in range(n_sites)]
    for _ in range(1000):
        owner = np.empty(n_slides, np.int64)
        if how == "quantity":
            p = rng.dirichlet(np.full(n_sites, alpha))
            owner[:] = rng.choice(n_sites, size=n_slides, p=p)
        elif how == "dirichlet":
            cls = np.asarray(slide_class)
            for c in np.unique(cls):
                idx = np.flatnonzero(cls == c)
                owner[idx] = rng.choice(n_sites, size=len(idx), p=rng.dirichlet(np.full(n_sites, alpha)))
        else:
            raise ConfigError(f"data.tiles.partition: unknown partition {how!r}")
        parts = [np.flatnonzero(owner == s) for s in range(n_sites)]
        if min(len(p) for p in parts) >= min_per_site:
            return parts
    raise ConfigError(f"data.dirichlet_alpha: {alpha} cannot give every site {min_per_site} slides; raise it")


def slide_partition(index: TileIndex, cfg, n_sites: int) -> List[np.ndarray]:
    """Which slides each site owns, for this config (``partition: labels``: the site column of
    ``data.tiles.labels``, as the hospitals of a real consortium own their slides)."""
    if cfg.data.tiles.partition == "labels":
        from .labels import owned_by_site, read_labels

        names = [s.name for s in cfg.sites][:n_sites]
        return owned_by_site(read_labels(cfg.data.tiles.labels, index.slide_ids, names), index.slide_ids, names)
    skew = cfg.data.tiles.partition == "dirichlet"  # the only rule that looks at classes
    return partition_slides(len(index.slide_ids), n_sites, cfg.data.tiles.partition, cfg.run.seed,
                            cfg.data.dirichlet_alpha, index.slide_majority_class() if skew else ())


def site_tiles(index: TileIndex, cfg, site_index: int, n_sites: int,
               parts: Optional[List[np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """(train tile indices, validation tile indices, partition record) of one site."""
    parts = slide_partition(index, cfg, n_sites) if parts is None else parts
    tr_s, va_s = train_val_split(parts[site_index], cfg.data.val_fraction, cfg.run.seed, site_index, stream=37)
    tr = np.flatnonzero(np.isin(index.slide, tr_s))
    va = np.flatnonzero(np.isin(index.slide, va_s))
    return tr, va, {"train_slides": [index.slide_ids[i] for i in tr_s], "val_slides": [index.slide_ids[i] for i in va_s]}


def partition_record(index: TileIndex, cfg, site_names: Sequence[str]) -> Dict:
    """Per site: its slides, tile counts and class counts (recorded in manifest.json)."""
    parts = slide_partition(index, cfg, len(site_names))  # once, not once per site
    sites = {}
    for i, name in enumerate(site_names):
        tr, va, rec = site_tiles(index, cfg, i, len(site_names), parts)
        sites[name] = {**rec, "train": int(len(tr)), "val": int(len(va)),
                       "classes": {index.classes[c]: int(k) for c, k in zip(*np.unique(index.label[tr], return_counts=True))}}
    return {"dataset": "tiles", "partition": cfg.data.tiles.partition, "sites": sites}
