"""Tile batches: read a batch's tiles, then assemble and augment the WHOLE batch in a few array ops.

- Items are ``(tile index, seed)`` pairs: augmentation (flips, 90-degree
  rotations, crop positions) comes from each item's seed (hpcfl.wsi.batch), so
  a round is reproducible whatever the number of loader workers, and a resumed
  run is exact.
- A batch is read, then assembled in one go (:meth:`TileDataset.batch`):
  NumPy on the host, or CuPy on the GPU (hpcfl.wsi.feed decides), and leaves
  as torch tensors: pinned host memory when CUDA is present (pinned by the
  rank's process: in DataLoader workers the DataLoader pins in the parent), or
  GPU memory handed over through DLPack.
- Readers are shared by everyone in a process (hpcfl.wsi.readers.shared_reader)
  and opened again in each DataLoader worker: never pickled.
- ``batched_reads``: a batch's tiles are read slide by slide through cuCIM's
  multi-location ``read_region`` (always so when decoding on the GPU: that is
  where nvJPEG decodes a batch).
- ``crops_per_read`` > 1 is batch-by-transform: read one tile, cut several
  training crops from it.
- As a map-style dataset for torch's DataLoader, ``__getitems__`` returns the
  finished batch (collate with :func:`as_is`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .arrays import array_module, to_torch
from .batch import BatchSpec, assemble, batch_shape, resize_area, to_chw
from .feed import FeedPlan
from .index import TileIndex
from .readers import shared_reader


@dataclass
class RawBatch:
    """A batch as read: (N, T, T, 3) uint8 tiles (NumPy or CuPy), one seed and one label per tile."""

    tiles: Any
    seeds: np.ndarray
    labels: np.ndarray


class TileDataset:
    """Map-style dataset over the tiles of a TileIndex; an item is (tile index, seed)."""

    def __init__(self, index: TileIndex, spec: BatchSpec, backend: str = "cucim", batched_reads: bool = False,
                 plan: FeedPlan = FeedPlan()):
        self.index, self.spec, self.backend, self.plan = index, spec, backend, plan
        self.batched_reads = batched_reads or plan.decode != "cpu"

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> np.ndarray:
        """One tile, (T, T, 3) uint8 on the host."""
        ix = self.index
        s = int(ix.size[i])
        r = shared_reader(self.index.slide_paths[int(ix.slide[i])], self.backend)
        with r.lock:
            return r.read_region(ix.x[i], ix.y[i], int(ix.level[i]), (s, s))

    def read_tiles(self, tiles: Sequence[int]):
        """The tiles of a batch as one (N, T, T, 3) uint8 array where they are decoded (NumPy or CuPy)."""
        ix, plan = self.index, self.plan
        n, t = len(tiles), int(ix.size[tiles[0]])
        if not self.batched_reads:
            out = np.empty((n, t, t, 3), np.uint8)
            for k, i in enumerate(tiles):
                out[k] = self.read(int(i))
            return out
        xp = np if plan.decode == "cpu" else array_module("cupy")
        out = xp.empty((n, t, t, 3), xp.uint8)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for k, i in enumerate(tiles):
            groups.setdefault((int(ix.slide[i]), int(ix.level[i])), []).append(k)
        for (slide, level), ks in groups.items():
            r = shared_reader(ix.slide_paths[slide], self.backend)
            locs = [(int(ix.x[tiles[k]]), int(ix.y[tiles[k]])) for k in ks]
            with r.lock:
                got = r.read_batch(locs, level, (t, t), plan.cuda_device)
            out[xp.asarray(ks)] = got
        return out

    def fetch(self, items: Sequence[Tuple[int, int]]) -> RawBatch:
        tiles = [int(i) for i, _ in items]
        return RawBatch(self.read_tiles(tiles), np.asarray([int(s) for _, s in items], np.int64),
                        self.index.label[tiles].astype(np.int64))

    def finish(self, raw: RawBatch):
        """Assemble a read batch into (x, y) torch tensors: on the GPU (CuPy, DLPack) or on the host (pinned
        when the plan says so and this is the rank's process, written there directly with no extra copy)."""
        import torch

        spec, plan = self.spec, self.plan
        y = np.repeat(raw.labels, spec.per_item)
        if plan.on_gpu:
            cp = array_module("cupy")
            x = to_torch(assemble(cp, cp.asarray(raw.tiles), raw.seeds, spec))
            return x, torch.from_numpy(y).to(x.device)
        # Pinned only in the rank's own process: a DataLoader worker forked after CUDA was initialised cannot
        # pin ("CUDA error: initialization error"); the DataLoader pins its batches in the parent instead.
        if plan.pin and torch.utils.data.get_worker_info() is None:  # (host assembly implies host decoding)
            x = torch.empty(batch_shape(len(raw.seeds), spec), dtype=torch.float32, pin_memory=True)
            assemble(np, raw.tiles, raw.seeds, spec, out=x.numpy())
            return x, torch.from_numpy(y).pin_memory()
        return to_torch(assemble(np, raw.tiles, raw.seeds, spec)), torch.from_numpy(y)

    def batch(self, items: Sequence[Tuple[int, int]]):
        """Read and assemble one batch: (x, y) torch tensors."""
        return self.finish(self.fetch(items))

    def __getitem__(self, item: Tuple[int, int]):
        return self.batch([item])

    def __getitems__(self, items: Sequence[Tuple[int, int]]):
        """A DataLoader worker's whole batch (workers run on the host: hpcfl.wsi.feed refuses them with CUDA)."""
        return self.batch(items)


def as_is(batch):
    """DataLoader collate for :class:`TileDataset`: its ``__getitems__`` returns a finished batch."""
    return batch


class ReadTiled:
    """MONAI-style deterministic transform {"i": tile} -> {"img": (size, size, 3) float32 in [0, 1], "label"}
    (what SmartCacheDataset caches; flips and rotations run on every batch)."""

    def __init__(self, ds: TileDataset):
        self.ds = ds

    def __call__(self, d: dict) -> dict:
        i = int(d["i"])
        img = resize_area(np, self.ds.read(i)[None], self.ds.spec.size, 1.0 / 255.0)[0]
        return {"img": img, "label": int(self.ds.index.label[i])}


def smart_batch(images: Sequence[np.ndarray], labels: Sequence[int], seeds: Sequence[int], spec: BatchSpec,
                pin: bool = False):
    """A batch from SmartCacheDataset entries: stacked, then turned by each item's seed in one pass."""
    import torch

    from .batch import dihedral_codes, item_draws

    x = np.stack(images)
    codes = dihedral_codes(item_draws(seeds, 1)) if spec.augment else np.zeros(len(seeds), np.int8)
    n, h, w, c = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32, pin_memory=pin)
    to_chw(np, x, codes, 1.0, out=out.numpy())
    y = torch.as_tensor(np.asarray(labels, np.int64))
    return out, (y.pin_memory() if pin else y)


class OrderSampler:
    """Yields the (tile, seed) items of the current epoch, set by the trainer: the order is ours."""

    def __init__(self):
        self.items: List[Tuple[int, int]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
