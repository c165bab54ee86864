"""Tile datasets for torch's DataLoader, with MONAI transforms.

- Readers are opened lazily inside each process (and each DataLoader worker):
  never pickled, never shared.
- Items are ``(tile index, seed)`` pairs: augmentation is seeded per item from
  (run seed, round, epoch, tile), so a round is reproducible whatever the
  number of loader workers, and a resumed run is exact.
- ``batched_reads``: a batch's tiles are read slide by slide through cuCIM's
  multi-location ``read_region`` (torch's ``__getitems__`` hook).
- ``crops_per_read`` > 1 is batch-by-transform: read one tile, cut several
  training crops from it (MONAI ``RandSpatialCropSamples``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .arrays import to_chw_float
from .index import TileIndex
from .readers import SlideReader, open_slide


def build_transforms(input_size: int, tile_size: int, augment: bool, crops_per_read: int):
    """MONAI pipelines on CHW float arrays: (train, eval).

    MONAI's metadata tracking is switched off: we carry no metadata, and
    building MetaTensors dominated the cost of transforming small tiles.
    """
    from monai.data import set_track_meta
    from monai.transforms import (CenterSpatialCrop, Compose, RandFlip, RandRotate90, RandSpatialCropSamples,
                                  Resize)

    if crops_per_read > 1:
        base = [RandSpatialCropSamples((input_size, input_size), num_samples=crops_per_read, random_size=False)]
        evaluate = Compose([CenterSpatialCrop((input_size, input_size))])
    else:
        base = [Resize((input_size, input_size), mode="area")] if input_size != tile_size else []
        evaluate = Compose(list(base))
    set_track_meta(False)
    aug = [RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1), RandRotate90(prob=0.5)] if augment else []
    return Compose(base + aug), evaluate


def seed_transforms(transform, seed: int) -> None:
    """Re-seed every random MONAI transform in place (Compose.set_random_state builds new
    generators, which cost more than the transforms on small tiles)."""
    for k, t in enumerate(getattr(transform, "transforms", [transform])):
        if hasattr(t, "R"):
            t.R.seed((int(seed) + 7919 * k) % (2**32))


class TileDataset:
    """Map-style dataset over tiles of a TileIndex; an item is (tile index, seed)."""

    def __init__(self, index: TileIndex, transform, backend: str = "cucim", batched_reads: bool = False,
                 xp_name: str = "numpy"):
        self.index = index
        self.transform = transform
        self.backend = backend
        self.batched_reads = batched_reads
        self.xp_name = xp_name
        self._readers: Dict[int, SlideReader] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}  # readers never cross a process boundary
        return state

    def reader(self, slide: int) -> SlideReader:
        if os.getpid() != self._pid:  # forked into a worker: open our own files
            self._readers, self._pid = {}, os.getpid()
        r = self._readers.get(slide)
        if r is None:
            r = self._readers[slide] = open_slide(self.index.slide_paths[slide], self.backend)
        return r

    def read(self, i: int) -> np.ndarray:
        ix = self.index
        s = int(ix.size[i])
        return self.reader(int(ix.slide[i])).read_region(ix.x[i], ix.y[i], int(ix.level[i]), (s, s))

    def _finish(self, item: Tuple[int, int], rgb: np.ndarray) -> List[Tuple[Any, int]]:
        i, seed = item
        img = to_chw_float(rgb, self.xp_name)
        seed_transforms(self.transform, seed)
        out = self.transform(img)
        label = int(self.index.label[i])
        crops = out if isinstance(out, list) else [out]
        return [(np.asarray(c, dtype=np.float32), label) for c in crops]

    def __getitem__(self, item: Tuple[int, int]):
        return self._finish(item, self.read(int(item[0])))

    def __getitems__(self, items: Sequence[Tuple[int, int]]):
        if not self.batched_reads:
            return [self[it] for it in items]
        ix = self.index
        rgbs: List[Optional[np.ndarray]] = [None] * len(items)
        groups: Dict[Tuple[int, int, int], List[int]] = {}
        for k, (i, _) in enumerate(items):
            groups.setdefault((int(ix.slide[i]), int(ix.level[i]), int(ix.size[i])), []).append(k)
        for (slide, level, size), ks in groups.items():
            locs = [(int(ix.x[items[k][0]]), int(ix.y[items[k][0]])) for k in ks]
            for k, rgb in zip(ks, self.reader(slide).read_regions(locs, level, (size, size))):
                rgbs[k] = rgb
        return [self._finish(it, rgb) for it, rgb in zip(items, rgbs)]


class ReadTiled:
    """MONAI-style deterministic transform {"i": tile} -> {"img": CHW float, "label": class}
    (what SmartCacheDataset caches; random transforms after it run on every access)."""

    def __init__(self, ds: "TileDataset"):
        self.ds = ds

    def __call__(self, d: dict) -> dict:
        i = int(d["i"])
        return {"img": to_chw_float(self.ds.read(i), self.ds.xp_name), "label": int(self.ds.index.label[i])}


def collate(batch):
    """Flatten the crops of every item into one batch of (x, y) tensors."""
    import torch

    pairs = [p for item in batch for p in item]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))
    y = torch.as_tensor([p[1] for p in pairs], dtype=torch.int64)
    return x, y


class OrderSampler:
    """Yields the (tile, seed) items of the current epoch, set by the trainer: the order is ours."""

    def __init__(self):
        self.items: List[Tuple[int, int]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
