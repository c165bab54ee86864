"""A site's slides as bags of tile features (``data.name: features``), for ``task: mil``.

Every labelled slide with a feature file has a fixed position in the federation's
slide list (sorted ids): the MIL task writes each validation slide's scores at
its position, so the sums of the sites' evaluation vectors carry every slide's
score exactly once (pooled AUC, :mod:`hpcfl.tasks.mil`). Sites own whole slides
(the labels' site column, or a seeded round-robin), split by slide into
training and validation; each rank of a site trains on its shard of the
site's training slides every epoch.

A batch is ``(x, y)``: ``x`` (slides, most tiles, dim) float32, zero-padded;
``y`` (slides, 3) int64: label, tiles, position in the slide list. Training
samples at most ``data.bags.max_tiles`` tiles of a slide per step (seeded).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..data import epoch_shard, steps_per_epoch, train_val_split
from ..errors import ConfigError
from ..site.data import SiteData
from ..wsi.labels import SlideLabels, owned_by_site, read_labels
from .store import FeatureError, feature_slide_ids, load_bags

EVAL_TILES = 1 << 16  # an evaluation batch holds at most this many tile rows (padded)


@lru_cache(maxsize=4)
def _labels(feature_dir: str, labels_csv: str, sites: Tuple[str, ...]) -> SlideLabels:
    ids = feature_slide_ids(feature_dir)
    if not ids:
        raise FeatureError(f"data.bags.dir: {feature_dir} holds no feature files; run "
                           "`hpcfl features RUN_DIR --out DIR` first")
    return read_labels(labels_csv, ids, sites)


def slide_labels(cfg) -> SlideLabels:
    """The federation's labelled slides (those with features), checked: read once per process."""
    f = cfg.data.bags
    if not f.labels:
        raise ConfigError("data.bags.labels: a slide labels CSV (slide_id,label[,site]) is required")
    return _labels(f.dir, f.labels, tuple(s.name for s in cfg.sites))


def site_slides(cfg, labels: SlideLabels) -> List[np.ndarray]:
    """Positions (in the slide list) of the slides each site owns."""
    names = [s.name for s in cfg.sites]
    if cfg.data.bags.partition == "labels":
        return owned_by_site(labels, labels.slide_ids, names)
    from ..wsi.index import partition_slides

    return partition_slides(len(labels.slide_ids), len(names), "slide", cfg.run.seed)


def split(cfg, labels: SlideLabels, site_index: int) -> Tuple[np.ndarray, np.ndarray]:
    parts = site_slides(cfg, labels)
    return train_val_split(parts[site_index], cfg.data.val_fraction, cfg.run.seed, site_index, stream=37)


def pad(bags: Sequence[np.ndarray], rows: Sequence[Tuple[int, int]], dim: int):
    """(x, y) torch tensors of a batch: ``rows`` = (label, position) per bag."""
    import torch

    n = max(len(b) for b in bags)
    x = np.zeros((len(bags), n, dim), np.float32)
    for k, b in enumerate(bags):
        x[k, :len(b)] = b
    y = np.asarray([(lab, len(b), pos) for b, (lab, pos) in zip(bags, rows)], np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


class BagData(SiteData):
    """One rank's view of one site's slides as feature bags (loaded once, held in memory)."""

    def __init__(self, cfg, topology, role):
        self.cfg, self.role = cfg, role
        self.labels = slide_labels(cfg)
        self.train_pos, val = split(cfg, self.labels, role.site.index)
        self.val_pos = val[role.rank_in_site::role.site.size]
        mine = sorted(set(self.train_pos.tolist()) | set(self.val_pos.tolist()))
        bags = load_bags(cfg.data.bags.dir, [self.labels.slide_ids[p] for p in mine])
        self.bags: Dict[int, Any] = dict(zip(mine, bags))
        self.dim = int(bags[0].features.shape[1])
        self.num_classes = len(self.labels.classes)
        self.input_shape = (self.dim,)
        self.num_train = int(len(self.train_pos))
        if self.num_train < role.site.size:
            raise ConfigError(f"site {role.site.name!r}: {self.num_train} training slides for {role.site.size} ranks")

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.num_train, self.role.site.size, batch_size)

    def _row(self, p: int) -> Tuple[int, int]:
        return self.labels.labels[p], p

    def epoch_batches(self, round_: int, epoch: int, batch_size: int) -> Iterator[Tuple[Any, Any]]:
        r, seed, cap = self.role, self.cfg.run.seed, self.cfg.data.bags.max_tiles
        shard = epoch_shard(self.train_pos, r.rank_in_site, r.site.size, seed, round_, epoch, r.site.index)
        rng = np.random.default_rng([seed, 53, round_, epoch, r.rank])
        for b in range(0, len(shard), batch_size):
            bags = []
            for p in shard[b:b + batch_size].tolist():
                f = self.bags[p].features
                bags.append(f[np.sort(rng.choice(len(f), cap, replace=False))] if len(f) > cap else f)
            yield pad(bags, [self._row(p) for p in shard[b:b + batch_size].tolist()], self.dim)

    def _eval(self, positions: Sequence[int], batch_size: int):
        batch: List[int] = []
        for p in positions:
            longest = max([len(self.bags[q].features) for q in batch + [p]])
            if batch and (len(batch) >= batch_size or longest * (len(batch) + 1) > EVAL_TILES):
                yield pad([self.bags[q].features for q in batch], [self._row(q) for q in batch], self.dim)
                batch = []
            batch.append(p)
        if batch:
            yield pad([self.bags[q].features for q in batch], [self._row(q) for q in batch], self.dim)

    def val_batches(self, batch_size: int):
        return self._eval(self.val_pos.tolist(), batch_size)

    def train_eval_batches(self, batch_size: int):
        return self._eval(self.train_pos[self.role.rank_in_site::self.role.site.size].tolist(), batch_size)

    def partition_record(self, site_names: Sequence[str]) -> Dict[str, Any]:
        sites = {}
        lab = self.labels
        for i, name in enumerate(site_names):
            tr, va = split(self.cfg, lab, i)
            count = np.bincount([lab.labels[p] for p in tr], minlength=len(lab.classes))
            sites[name] = {"train": int(len(tr)), "val": int(len(va)),
                           "train_slides": [lab.slide_ids[p] for p in tr], "val_slides": [lab.slide_ids[p] for p in va],
                           "classes": {c: int(k) for c, k in zip(lab.classes, count)}}
        return {"dataset": "features", "partition": self.cfg.data.bags.partition, "labels": lab.path,
                "classes": lab.classes, "sites": sites}
