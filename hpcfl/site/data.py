"""What a site rank trains and validates on: in-memory arrays or WSI tiles, behind one interface.

Every rank of a site gets a shard of equal size each epoch (so all take the
same number of steps: Horovod's allreduce would hang otherwise) from a shuffle
seeded by (run seed, round, epoch, site): reproducible, and exact on resume.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Iterator, Tuple

import numpy as np

from ..data import epoch_shard, load_dataset, partition_summary, site_split, steps_per_epoch


class SiteData(ABC):
    num_train: int  # samples the site trains on: its FedAvg weight
    num_classes: int
    input_shape: Tuple[int, ...]

    @abstractmethod
    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one epoch; the same on every rank of the site."""

    @abstractmethod
    def epoch_batches(self, round_: int, epoch: int, batch_size: int) -> Iterator[Tuple[Any, Any]]:
        """(x, y) torch batches of this rank's shard for one epoch."""

    @abstractmethod
    def val_batches(self, batch_size: int) -> Iterator[Tuple[Any, Any]]:
        """(x, y) torch batches of this rank's part of the site's validation data."""

    @abstractmethod
    def partition_record(self, site_names) -> Dict[str, Any]:
        """How the data was split over all sites (written to manifest.json)."""

    def close(self) -> None:
        """Release readers and loader workers."""


class ArrayData(SiteData):
    """Datasets that fit in memory (digits, synthetic): batches are tensor slices."""

    def __init__(self, cfg, topology, role):
        import torch

        self.cfg, self.role, self.torch = cfg, role, torch
        self.ds = load_dataset(cfg)
        self.num_classes, self.input_shape = self.ds.num_classes, self.ds.input_shape
        self.train_idx, val_idx = site_split(cfg, self.ds, role.site.index, len(topology.sites))
        self.num_train = int(len(self.train_idx))
        self.val_idx = val_idx[role.rank_in_site::role.site.size]
        self.x, self.y = torch.from_numpy(self.ds.x), torch.from_numpy(self.ds.y)

    def steps_per_epoch(self, batch_size):
        return steps_per_epoch(self.num_train, self.role.site.size, batch_size)

    def epoch_batches(self, round_, epoch, batch_size):
        r = self.role
        shard = self.torch.from_numpy(epoch_shard(self.train_idx, r.rank_in_site, r.site.size, self.cfg.run.seed,
                                                  round_, epoch, r.site.index))
        for b in range(0, len(shard), batch_size):
            idx = shard[b:b + batch_size]
            yield self.x[idx], self.y[idx]

    def val_batches(self, batch_size):
        for b in range(0, len(self.val_idx), batch_size):
            idx = self.torch.from_numpy(self.val_idx[b:b + batch_size])
            yield self.x[idx], self.y[idx]

    def partition_record(self, site_names):
        return partition_summary(self.cfg, self.ds, site_names)


class TileData(SiteData):
    """Tiles of the slides this site owns, read through cuCIM/OpenSlide by a DataLoader."""

    def __init__(self, cfg, topology, role, run_dir):
        from ..wsi.arrays import resolved_name
        from ..wsi.cache import configure_cache
        from ..wsi.dataset import OrderSampler, TileDataset, build_transforms, collate
        from ..wsi.index import load_index, site_tiles

        import torch

        t = cfg.data.tiles
        if t.backend == "cucim":  # before cuCIM reads its config (the first CuImage)
            configure_cache(t.cache.type, t.cache.capacity_mb, run_dir)
        self.cfg, self.role, self.topology, self.torch = cfg, role, topology, torch
        self.index = load_index(t.index_dir)
        if t.backend == "cucim":
            from ..wsi.readers import warm_up_cucim

            warm_up_cucim(self.index.slide_paths[0])  # must precede Horovod: see its docstring
        self.num_classes = len(self.index.classes)
        self.input_shape = (3, t.input_size, t.input_size)
        self.train_idx, val_idx, _ = site_tiles(self.index, cfg, role.site.index, len(topology.sites))
        self.crops = t.crops_per_read
        self.num_train = int(len(self.train_idx)) * self.crops
        self.val_idx = val_idx[role.rank_in_site::role.site.size]
        xp = resolved_name(cfg.data.array_backend)
        train_tf, eval_tf = build_transforms(t.input_size, t.tile_size, t.augment, t.crops_per_read)
        self.train_ds = TileDataset(self.index, train_tf, t.backend, t.batched_reads, xp)
        self.eval_ds = TileDataset(self.index, eval_tf, t.backend, t.batched_reads, xp)
        self.sampler = OrderSampler()
        self._loader_args = dict(num_workers=t.loader_workers, collate_fn=collate,
                                 persistent_workers=t.loader_workers > 0)
        self._loaders: Dict[int, Any] = {}
        self.smart = None
        if t.smart_cache is not None:
            self._start_smart_cache(t)

    def _start_smart_cache(self, t) -> None:
        """MONAI SmartCacheDataset over a fixed per-rank shard: the deterministic part (read, resize)
        is cached, ``replace_rate`` of the cache is refreshed every epoch, augmentation runs on access."""
        from monai.data import SmartCacheDataset
        from monai.transforms import Compose, RandFlipd, RandRotate90d, Resized

        from ..errors import ConfigError
        from ..wsi.dataset import ReadTiled

        if t.crops_per_read > 1 or t.loader_workers > 0:
            raise ConfigError("data.tiles.smart_cache: use it with crops_per_read: 1 and loader_workers: 0 "
                              "(MONAI's SmartCacheDataset breaks with persistent loader workers)")
        r, seed = self.role, self.cfg.run.seed
        perm = np.random.default_rng([seed, 43, r.site.index]).permutation(self.train_idx)
        per = len(perm) // r.site.size
        shard = perm[r.rank_in_site * per:(r.rank_in_site + 1) * per]
        self.smart_num = min(t.smart_cache.cache_num, per)
        steps = [ReadTiled(self.train_ds)]
        if t.input_size != t.tile_size:
            steps.append(Resized("img", (t.input_size, t.input_size), mode="area"))
        if t.augment:
            steps += [RandFlipd("img", prob=0.5, spatial_axis=0), RandFlipd("img", prob=0.5, spatial_axis=1),
                      RandRotate90d("img", prob=0.5)]
        self.smart_tf = Compose(steps)
        self.smart = SmartCacheDataset([{"i": int(i)} for i in shard], transform=self.smart_tf,
                                       replace_rate=t.smart_cache.replace_rate, cache_num=self.smart_num,
                                       num_init_workers=1, num_replace_workers=1, progress=False, shuffle=False)
        self.smart.start()

    def _loader(self, batch_size: int):
        """One DataLoader per batch size, created once: its workers (if any) persist across epochs."""
        if batch_size not in self._loaders:
            self._loaders[batch_size] = self.torch.utils.data.DataLoader(
                self.train_ds, batch_size=batch_size, sampler=self.sampler, **self._loader_args)
        return self._loaders[batch_size]

    def steps_per_epoch(self, batch_size):
        if self.smart is not None:
            return -(-self.smart_num // batch_size)
        return steps_per_epoch(len(self.train_idx), self.role.site.size, batch_size)

    def _smart_epoch(self, round_, epoch, batch_size):
        from ..wsi.dataset import seed_transforms

        r, seed = self.role, self.cfg.run.seed
        rng = np.random.default_rng([seed, 47, round_, epoch, r.rank])
        seed_transforms(self.smart_tf, int(rng.integers(2**31)))
        order = rng.permutation(self.smart_num)
        for b in range(0, len(order), batch_size):
            items = [self.smart[int(k)] for k in order[b:b + batch_size]]
            yield (self.torch.stack([self.torch.as_tensor(np.asarray(d["img"], np.float32)) for d in items]),
                   self.torch.as_tensor([d["label"] for d in items], dtype=self.torch.int64))
        self.smart.update_cache()

    def epoch_batches(self, round_, epoch, batch_size):
        if self.smart is not None:
            yield from self._smart_epoch(round_, epoch, batch_size)
            return
        r, seed = self.role, self.cfg.run.seed
        shard = epoch_shard(self.train_idx, r.rank_in_site, r.site.size, seed, round_, epoch, r.site.index)
        seeds = np.random.default_rng([seed, 41, round_, epoch, r.rank]).integers(0, 2**31 - 1, len(shard))
        self.sampler.items = list(zip(shard.tolist(), seeds.tolist()))
        yield from self._loader(batch_size)

    def val_batches(self, batch_size):
        from ..wsi.dataset import collate

        items = [(int(i), 0) for i in self.val_idx]
        for b in range(0, len(items), batch_size):
            yield collate(self.eval_ds.__getitems__(items[b:b + batch_size]))

    def partition_record(self, site_names):
        from ..wsi.index import partition_record

        return partition_record(self.index, self.cfg, site_names)

    def close(self) -> None:
        if self.smart is not None:
            self.smart.shutdown()
            self.smart = None


def make_site_data(cfg, topology, role, run_dir) -> SiteData:
    if cfg.data.name == "tiles":
        return TileData(cfg, topology, role, run_dir)
    return ArrayData(cfg, topology, role)
