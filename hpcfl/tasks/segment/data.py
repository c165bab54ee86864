"""What a site rank trains and validates on for ``task: segment``: MONAI dictionary pipelines.

Items are dictionaries ``{"image", "label"}`` through MONAI transforms: the deterministic ones
(load, channel first, intensity, checks, foreground/background indices) run once per item and are
cached (``segment.cache``: CacheDataset, SmartCacheDataset, or none), the random ones
(RandCropByPosNegLabeld, flips, rotations) run on every epoch, and batches come out of MONAI's
ThreadDataLoader (or torch's DataLoader). Two kinds of data:

* volumes (``data.name: volumes``): a site's decathlon datalist of NIfTI pairs; training on
  patches sampled by label, validation on whole volumes by sliding window (in the task);
* tiles (``data.name: tiles``): the tile index's tiles of the site's slides with their masks at
  tile resolution (hpcfl.tasks.segment.masks); training and validation on whole tiles.

Every rank of a site owns a fixed shard of the site's training items (MONAI's partition_dataset,
padded to equal length so every rank takes the same number of steps), shuffled every epoch from
(run seed, round, epoch, rank); random transforms are seeded the same way, so a round is a pure
function of its inputs, as for the other data.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
from monai.transforms import Transform  # site ranks only import this module (rank 0 never imports torch)

from ...errors import ConfigError, HpcflError
from ...site.data import SiteData
from .masks import tile_classes


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def data_errors() -> Iterator[None]:
    """MONAI wraps an exception raised in a transform in RuntimeError("applying transform ..."): ours (one
    line naming the file) is raised as it was, without the wrapping."""
    try:
        yield
    except RuntimeError as exc:
        cause: Any = exc
        while cause is not None and not isinstance(cause, HpcflError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _plain(t: Any) -> Any:
    """A MONAI MetaTensor as a plain tensor (the model needs no metadata; MetaTensor ops cost more)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


class CheckLabelsd(Transform):
    """Deterministic transform: the label holds only the declared classes (else one line naming its file).
    A MONAI Transform: CacheDataset caches up to the first transform that is random OR not a Transform."""

    def __init__(self, num_classes: int, classes: Sequence[str], key: str = "label"):
        self.num_classes, self.classes, self.key = num_classes, tuple(classes), key

    def __call__(self, d: Dict[str, Any]) -> Dict[str, Any]:
        from .volumes import check_labels

        lab = d[self.key]
        meta = getattr(lab, "meta", {}) or {}
        where = str(meta.get("filename_or_obj") or d.get("label_file") or self.key)
        check_labels(_plain(lab).numpy() if hasattr(lab, "numpy") else np.asarray(lab), self.num_classes, where,
                     self.classes)
        return d


class SeededItems:
    """One epoch of a MONAI dataset: item ``order[j]`` with the random transforms seeded by ``seeds[j]``, so
    an item's crops and flips depend on nothing else (not the batch it falls in, not the loader's thread)."""

    def __init__(self, ds, transform, order: np.ndarray, seeds: np.ndarray):
        self.ds, self.transform, self.order, self.seeds = ds, transform, order.tolist(), seeds.tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        self.transform.set_random_state(seed=self.seeds[j])  # items are read one after another (num_workers 0)
        return self.ds[self.order[j]]


class MonaiSiteData(SiteData):
    """A site's shard of dictionary items through cached deterministic and per-epoch random transforms."""

    def __init__(self, cfg, role, train: List[Dict[str, Any]], val: List[Dict[str, Any]], det: List[Any],
                 rand: List[Any], device: Any, val_batch: int = 0):
        from monai.data import partition_dataset
        from monai.transforms import Compose

        self.cfg, self.role, self.seg = cfg, role, cfg.segment
        if len(train) < 1:
            raise ConfigError(f"site {role.site.name}: no training items")
        self.num_train = len(train)
        if device is not None and self.seg.cache_on_device and getattr(device, "type", "cpu") == "cuda":
            from monai.transforms import ToDeviced  # pragma: no cover - needs a GPU

            det = det + [ToDeviced(keys=["image", "label"], device=device)]  # pragma: no cover
        self.det, self.train_tf = Compose(det), Compose(det + rand)
        parts = partition_dataset(train, num_partitions=role.site.size, shuffle=True, even_divisible=True,
                                  seed=_seed(cfg.run.seed, 53, role.site.index))
        self.shard = parts[role.rank_in_site]
        mine = val[role.rank_in_site::role.site.size]
        with data_errors():
            self.train_ds = self._dataset(self.shard, self.train_tf, self.seg.cache)
            self.val_ds = self._dataset(mine, self.det, "cache" if self.seg.cache != "none" else "none")
        self.val_batch = val_batch  # 0: the caller's batch size; 1 for whole volumes of any size

    def _dataset(self, items, transform, kind: str):
        from monai.data import CacheDataset, Dataset, SmartCacheDataset

        if kind == "none" or not items:
            return Dataset(items, transform)
        if kind == "smart":
            n = max(1, int(round(len(items) * self.seg.cache_rate)))
            ds = SmartCacheDataset(items, transform, replace_rate=self.seg.replace_rate, cache_num=n,
                                   num_init_workers=1, num_replace_workers=1, progress=False, shuffle=False)
            ds.start()
            return ds
        return CacheDataset(items, transform, cache_rate=self.seg.cache_rate, num_workers=1, progress=False)

    @property
    def epoch_items(self) -> int:
        return len(self.train_ds)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, -(-self.epoch_items // batch_size))

    def _loader(self, ds, batch_size: int):
        import torch
        from monai.data import ThreadDataLoader, list_data_collate

        if self.seg.thread_loader:
            return ThreadDataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                                    collate_fn=list_data_collate)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                                           collate_fn=list_data_collate)

    def epoch_batches(self, round_: int, epoch: int, batch_size: int):
        import torch

        r, seed = self.role, self.cfg.run.seed
        rng = np.random.default_rng([seed, 59, round_, epoch, r.rank])
        order, seeds = rng.permutation(self.epoch_items), rng.integers(0, 2**31 - 1, self.epoch_items)
        with data_errors():
            for b in self._loader(SeededItems(self.train_ds, self.train_tf, order, seeds), batch_size):
                yield _plain(b["image"]).float(), _plain(b["label"]).long()
        if hasattr(self.train_ds, "update_cache"):
            self.train_ds.update_cache()  # SmartCacheDataset: replace_rate of the cache for the next epoch

    def val_batches(self, batch_size: int):
        with data_errors():
            for b in self._loader(self.val_ds, self.val_batch or batch_size):
                yield _plain(b["image"]).float(), _plain(b["label"]).long()

    def close(self) -> None:
        if hasattr(self.train_ds, "shutdown"):
            self.train_ds.shutdown()


# -- volumes -----------------------------------------------------------------------------------------------------

def volume_transforms(seg, classes: Sequence[str]) -> Tuple[List[Any], List[Any]]:
    """(deterministic, random) MONAI transforms of the 3D pipeline (the spleen tutorial's stages)."""
    from monai.transforms import (DeleteItemsd, EnsureChannelFirstd, EnsureTyped, FgBgToIndicesd, LoadImaged,
                                  NormalizeIntensityd, Orientationd, RandCropByPosNegLabeld, RandFlipd,
                                  ScaleIntensityRanged, SpatialPadd)

    keys = ["image", "label"]
    if seg.intensity_range:
        lo, hi = seg.intensity_range
        intensity = ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    else:
        intensity = NormalizeIntensityd(keys="image")
    det = [LoadImaged(keys=keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys=keys),
           CheckLabelsd(len(classes) + 1, classes), Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))), intensity,
           SpatialPadd(keys=keys, spatial_size=list(seg.patch_size)),
           FgBgToIndicesd(keys="label", fg_postfix="_fg", bg_postfix="_bg"), EnsureTyped(keys=keys, track_meta=False)]
    pos = seg.pos_fraction
    rand = [RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=list(seg.patch_size), pos=pos,
                                   neg=1.0 - pos, num_samples=seg.samples_per_volume, fg_indices_key="label_fg",
                                   bg_indices_key="label_bg"),
            DeleteItemsd(keys=["label_fg", "label_bg"]), RandFlipd(keys=keys, prob=0.5, spatial_axis=0)]
    return det, rand


class VolumeData(MonaiSiteData):
    def __init__(self, cfg, topology, role, device: Any = None):
        from .volumes import check_site, read_site

        vols = check_site(read_site(cfg, role.site.name, role.site.index))
        self.classes = vols.classes
        self.num_classes = len(vols.classes) + 1
        self.input_shape = (vols.channels, *cfg.segment.patch_size)
        det, rand = volume_transforms(cfg.segment, vols.classes)
        super().__init__(cfg, role, vols.training, vols.validation, det, rand, device, val_batch=1)
        self.topology = topology

    def partition_record(self, site_names):
        from .volumes import volume_record

        return volume_record(self.cfg, site_names)


# -- tiles -------------------------------------------------------------------------------------------------------

class LoadTileMask(Transform):
    """Deterministic transform {"i": tile} -> {"image": (3, S, S) float32 in [0, 1], "label": (1, S, S)}: the
    tile read through the shared reader and area-resized, its mask sampled from the slide's raster."""

    def __init__(self, index, size: int, classes: Sequence[str], backend: str):
        self.index, self.size, self.classes, self.backend = index, size, tuple(classes), backend

    def __call__(self, d: Dict[str, Any]) -> Dict[str, Any]:
        from ...wsi.batch import resize_area
        from ...wsi.readers import shared_reader
        from .masks import shared_mask, tile_mask

        ix, i = self.index, int(d["i"])
        path = ix.slide_paths[int(ix.slide[i])]
        r = shared_reader(path, self.backend)
        s, level = int(ix.size[i]), int(ix.level[i])
        with r.lock:
            tile = r.read_region(ix.x[i], ix.y[i], level, (s, s))
            shape0, side0 = r.level_dimensions(0), s * r.level_downsample(level)
        raster, down = shared_mask(path, shape0, self.classes)
        img = resize_area(np, np.asarray(tile)[None], self.size, 1.0 / 255.0)[0].transpose(2, 0, 1)
        lab = tile_mask(raster, down, float(ix.x[i]), float(ix.y[i]), side0, self.size)[None]
        return {"image": np.ascontiguousarray(img), "label": lab.astype(np.int64)}


class TileMaskData(MonaiSiteData):
    def __init__(self, cfg, topology, role, run_dir, device: Any = None):
        from monai.transforms import EnsureTyped, NormalizeIntensityd, RandFlipd, RandRotate90d

        from ...wsi.cache import configure_cache
        from ...wsi.index import shared_index, site_tiles

        t = cfg.data.tiles
        if t.backend == "cucim":
            from ...wsi.readers import warm_up_cucim

            configure_cache(t.cache.type, t.cache.capacity_mb, run_dir)
        self.index = shared_index(t.index_dir)
        if t.backend == "cucim":
            warm_up_cucim(self.index.slide_paths[0])  # before Horovod (hpcfl.wsi.readers.warm_up_cucim)
        self.classes = tile_classes(cfg, self.index)
        self.num_classes = len(self.classes) + 1
        self.input_shape = (3, t.input_size, t.input_size)
        tr, va, _ = site_tiles(self.index, cfg, role.site.index, len(topology.sites))
        keys = ["image", "label"]
        det = [LoadTileMask(self.index, t.input_size, self.classes, t.backend), EnsureTyped(keys=keys)]
        if cfg.segment.tile_normalize:  # a slide's stain shifts all its tiles' colours (as between hospitals)
            det.append(NormalizeIntensityd(keys="image", channel_wise=True))
        rand = [RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
                RandRotate90d(keys=keys, prob=0.5, max_k=3)] if t.augment else []
        super().__init__(cfg, role, [{"i": int(i)} for i in tr], [{"i": int(i)} for i in va], det, rand, device)

    def partition_record(self, site_names):
        from ...wsi.index import partition_record

        return partition_record(self.index, self.cfg, site_names)
