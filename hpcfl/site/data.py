"""What a site rank trains and validates on: in-memory arrays or WSI tiles, behind one interface.

Every rank of a site gets a shard of equal size each epoch (so all take the
same number of steps: Horovod's allreduce would hang otherwise) from a shuffle
seeded by (run seed, round, epoch, site): reproducible, and exact on resume.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from ..data import (epoch_shard, held_out, load_dataset, partition_summary, site_partition, steps_per_epoch,
                    train_val_split)


@dataclass(frozen=True)
class SiteRank:
    """One rank's view of one site it simulates: what the data layer needs.

    ``rank`` is the rank's *virtual* world rank (the one it would have with one slot
    per site), so seeds, and with them results, do not depend on how many slots
    simulate the federation."""

    site: Any  # hpcfl.topology.Site: index, name, size
    rank_in_site: int
    rank: int


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

    def train_eval_batches(self, batch_size: int) -> Iterator[Tuple[Any, Any]]:
        """(x, y) batches of this rank's part of the site's TRAINING data, un-augmented, in a fixed
        order (a k-NN bank or a linear probe's training set for self-supervised tasks)."""
        raise NotImplementedError(f"{type(self).__name__} does not offer training data for evaluation")

    @abstractmethod
    def partition_record(self, site_names) -> Dict[str, Any]:
        """How the data was split over all sites (written to manifest.json)."""

    def close(self) -> None:
        """Release readers and loader workers."""


class SharedArrays:
    """One process's copy of an in-memory dataset and its split over sites, shared by every site it simulates
    (128 sites in one process load the data once, and hold it once, on the device)."""

    def __init__(self, cfg, n_sites: int, device: Any = None):
        import torch

        self.ds = load_dataset(cfg)
        self.parts = site_partition(cfg, self.ds.y, n_sites)
        self.held = held_out(len(self.ds.y), cfg.eval.central_fraction, cfg.run.seed)[0] \
            if cfg.eval.central_fraction else None  # eval.central_fraction: hpcfl.central
        self.x = torch.from_numpy(self.ds.x)
        self.y = torch.from_numpy(self.ds.y)
        if device is not None and torch.device(device).type != "cpu":
            self.x, self.y = self.x.to(device), self.y.to(device)


class ArrayData(SiteData):
    """Datasets that fit in memory (digits, synthetic): batches are tensor slices, on the device."""

    def __init__(self, cfg, topology, role, shared: Optional[SharedArrays] = None):
        import torch

        self.cfg, self.role, self.torch = cfg, role, torch
        self.shared = shared or SharedArrays(cfg, len(topology.sites))
        self.ds = self.shared.ds
        self.num_classes, self.input_shape = self.ds.num_classes, self.ds.input_shape
        self.train_idx, val_idx = train_val_split(self.shared.parts[role.site.index], cfg.data.val_fraction,
                                                  cfg.run.seed, role.site.index)
        self.num_train = int(len(self.train_idx))
        self.val_idx = val_idx[role.rank_in_site::role.site.size]
        self.x, self.y = self.shared.x, self.shared.y
        dev = self.x.device
        self._val = torch.from_numpy(self.val_idx).to(dev)
        self._train_eval = torch.from_numpy(self.train_idx[role.rank_in_site::role.site.size]).to(dev)

    def steps_per_epoch(self, batch_size):
        return steps_per_epoch(self.num_train, self.role.site.size, batch_size)

    def epoch_batches(self, round_, epoch, batch_size):
        r = self.role
        shard = self.torch.from_numpy(epoch_shard(self.train_idx, r.rank_in_site, r.site.size, self.cfg.run.seed,
                                                  round_, epoch, r.site.index)).to(self.x.device)
        for b in range(0, len(shard), batch_size):
            idx = shard[b:b + batch_size]
            yield self.x[idx], self.y[idx]

    def _slices(self, idx, batch_size):
        for b in range(0, len(idx), batch_size):
            yield self.x[idx[b:b + batch_size]], self.y[idx[b:b + batch_size]]

    def val_batches(self, batch_size):
        return self._slices(self._val, batch_size)

    def train_eval_batches(self, batch_size):
        return self._slices(self._train_eval, batch_size)

    def partition_record(self, site_names):
        return partition_summary(self.cfg, self.ds, site_names)


class TileData(SiteData):
    """Tiles of the slides this site owns: read through cuCIM/OpenSlide, assembled a whole batch at a time.

    Batches are assembled in the training thread, in a background thread
    (``data.tiles.prefetch`` ahead; the default when training on a GPU) or in
    DataLoader workers (``loader_workers``); ``data.tiles.decode_device`` and
    ``data.array_backend`` put decoding and assembly on the GPU (hpcfl.wsi.feed).
    Batches are (x, y) torch tensors: on the GPU already when assembled there, else
    on the host, pinned when CUDA is present (the trainer copies them non-blocking).

    Several instances in one process (one per simulated site) share the tile index,
    the open slide readers and cuCIM's tile cache; each holds only its tile indices.
    """

    def __init__(self, cfg, topology, role, run_dir):
        from ..errors import ConfigError
        from ..wsi.batch import BatchSpec
        from ..wsi.cache import configure_cache
        from ..wsi.dataset import OrderSampler, TileDataset, as_is
        from ..wsi.feed import check_gpu_decode, feed_plan
        from ..wsi.index import shared_index, site_tiles

        import torch

        t = cfg.data.tiles
        self.plan = feed_plan(cfg)  # refusals first, in one line
        if t.backend == "cucim":  # before cuCIM reads its config (the first CuImage)
            configure_cache(t.cache.type, t.cache.capacity_mb, run_dir)
        self.cfg, self.role, self.topology, self.torch = cfg, role, topology, torch
        self.index = shared_index(t.index_dir)
        sizes = np.unique(self.index.size)
        if len(sizes) != 1:
            raise ConfigError(f"data.tiles.index_dir: {t.index_dir} mixes tile sizes {sizes.tolist()}; "
                              "re-tile it with one tile_size")
        if t.crops_per_read > 1 and int(sizes[0]) < t.input_size:
            raise ConfigError(f"data.tiles.crops_per_read: crops of input_size {t.input_size} need tiles of at least "
                              f"that size; the index has {int(sizes[0])}-px tiles")
        if t.backend == "cucim":
            from ..wsi.readers import warm_up_cucim

            warm_up_cucim(self.index.slide_paths[0])  # must precede Horovod: see its docstring
            check_gpu_decode(self.index.slide_paths[0], self.plan)
        self.num_classes = len(self.index.classes)
        self.input_shape = (3, t.input_size, t.input_size)
        self.train_idx, val_idx, _ = site_tiles(self.index, cfg, role.site.index, len(topology.sites))
        self.crops = t.crops_per_read
        self.num_train = int(len(self.train_idx)) * self.crops
        self.val_idx = val_idx[role.rank_in_site::role.site.size]
        self.train_ds = TileDataset(self.index, BatchSpec(t.input_size, t.augment, t.crops_per_read, True),
                                    t.backend, t.batched_reads, self.plan)
        self.eval_ds = TileDataset(self.index, BatchSpec(t.input_size, False, t.crops_per_read, False),
                                   t.backend, t.batched_reads, self.plan)
        # A thread helps where the CPU would otherwise wait (on the GPU); a CPU rank has no core to spare
        # for it as a rule, and handing the GIL back and forth then costs more than it hides.
        self.prefetch = t.prefetch if t.prefetch is not None else (2 if self.plan.device >= 0 else 0)
        self.sampler = OrderSampler()
        self._loader_args = dict(num_workers=t.loader_workers, collate_fn=as_is,
                                 persistent_workers=t.loader_workers > 0, pin_memory=self.plan.pin)
        self._loaders: Dict[int, Any] = {}
        self.smart = None
        if t.smart_cache is not None:
            self._start_smart_cache(t)

    def _start_smart_cache(self, t) -> None:
        """MONAI SmartCacheDataset over a fixed per-rank shard: the deterministic part (read, resize)
        is cached, ``replace_rate`` of the cache is refreshed every epoch, flips/rotations run per batch."""
        from monai.data import SmartCacheDataset

        from ..errors import ConfigError
        from ..wsi.dataset import ReadTiled

        if t.crops_per_read > 1 or t.loader_workers > 0 or self.plan.on_gpu:
            raise ConfigError("data.tiles.smart_cache: use it with crops_per_read: 1, loader_workers: 0 and "
                              "decode_device: cpu (MONAI's SmartCacheDataset breaks with persistent loader workers)")
        r, seed = self.role, self.cfg.run.seed
        perm = np.random.default_rng([seed, 43, r.site.index]).permutation(self.train_idx)
        per = len(perm) // r.site.size
        shard = perm[r.rank_in_site * per:(r.rank_in_site + 1) * per]
        self.smart_num = min(t.smart_cache.cache_num, per)
        self.smart = SmartCacheDataset([{"i": int(i)} for i in shard], transform=ReadTiled(self.train_ds),
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
        from ..wsi.dataset import smart_batch

        r, seed = self.role, self.cfg.run.seed
        rng = np.random.default_rng([seed, 47, round_, epoch, r.rank])
        order = rng.permutation(self.smart_num)
        seeds = rng.integers(0, 2**31 - 1, self.smart_num)
        for b in range(0, len(order), batch_size):
            items = [self.smart[int(k)] for k in order[b:b + batch_size]]
            yield smart_batch([d["img"] for d in items], [d["label"] for d in items], seeds[b:b + batch_size],
                              self.train_ds.spec, self.plan.pin)
        self.smart.update_cache()

    def _thread_setup(self) -> None:
        """In the prefetch thread: CuPy's and torch's current device are per thread."""
        if self.plan.on_gpu:
            from ..wsi.arrays import array_module

            array_module("cupy").cuda.Device(self.plan.device).use()
            self.torch.cuda.set_device(self.plan.device)

    def _batches(self, ds, items, batch_size):
        from ..wsi.feed import prefetched

        source = (ds.batch(items[b:b + batch_size]) for b in range(0, len(items), batch_size))
        return prefetched(source, self.prefetch, self._thread_setup)

    def epoch_batches(self, round_, epoch, batch_size):
        if self.smart is not None:
            yield from self._smart_epoch(round_, epoch, batch_size)
            return
        r, seed = self.role, self.cfg.run.seed
        shard = epoch_shard(self.train_idx, r.rank_in_site, r.site.size, seed, round_, epoch, r.site.index)
        seeds = np.random.default_rng([seed, 41, round_, epoch, r.rank]).integers(0, 2**31 - 1, len(shard))
        items = list(zip(shard.tolist(), seeds.tolist()))
        if self._loader_args["num_workers"] == 0:
            yield from self._batches(self.train_ds, items, batch_size)
            return
        self.sampler.items = items
        yield from self._loader(batch_size)

    def val_batches(self, batch_size):
        yield from self._batches(self.eval_ds, [(int(i), 0) for i in self.val_idx], batch_size)

    def train_eval_batches(self, batch_size):
        mine = self.train_idx[self.role.rank_in_site::self.role.site.size]
        yield from self._batches(self.eval_ds, [(int(i), 0) for i in mine], batch_size)

    def partition_record(self, site_names):
        from ..wsi.index import partition_record

        return partition_record(self.index, self.cfg, site_names)

    def close(self) -> None:
        if self.smart is not None:
            self.smart.shutdown()
            self.smart = None
        self._loaders.clear()  # persistent loader workers end with their DataLoader


def make_site_data(cfg, topology, role, run_dir, shared: Optional[Dict[str, Any]] = None,
                   device: Any = None) -> SiteData:
    """The data of one site as one rank sees it. ``shared`` (a dict kept by the caller) lets the
    sites a process simulates share one copy of the dataset."""
    from ..tasks import task_class

    shared = {} if shared is None else shared
    own = task_class(cfg.task).site_data(cfg, topology, role, run_dir, shared, device)
    if own is not None:
        return own
    if cfg.data.name == "tiles":
        return TileData(cfg, topology, role, run_dir)
    if cfg.data.name == "features":
        from ..features.bags import BagData

        return BagData(cfg, topology, role)
    if "arrays" not in shared:
        shared["arrays"] = SharedArrays(cfg, len(topology.sites), device)
    return ArrayData(cfg, topology, role, shared["arrays"])
