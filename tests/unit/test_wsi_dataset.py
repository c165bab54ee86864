"""Tile batches from real (synthetic) slides: TileDataset and the site's TileData, on the CPU."""
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from hpcfl.config import from_dict
from hpcfl.errors import ConfigError
from hpcfl.wsi.batch import BatchSpec
from hpcfl.wsi.index import load_index, shared_index
from test_wsi_tiling import synth_index  # noqa: F401 - the fixture: 6 synthetic slides tiled at 64 px


def tile_data(synth_index, tmp_path, site=0, rank_in_site=0, **tiles):
    from hpcfl.site.data import TileData

    cfg = from_dict({"sites": [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 1}],
                     "data": {"name": "tiles", "val_fraction": 0.34,
                              "tiles": {"index_dir": str(synth_index / "index"), "tile_size": 64, "input_size": 32, **tiles}}})
    role = NS(rank=1 + 2 * site + rank_in_site, rank_in_site=rank_in_site, site=NS(index=site, size=cfg.sites[site].ranks))
    return TileData(cfg, NS(sites=cfg.sites), role, tmp_path)


def test_batches_are_seeded_per_item(synth_index):
    from hpcfl.wsi.dataset import TileDataset

    ix = load_index(synth_index / "index")
    ds = TileDataset(ix, BatchSpec(32, augment=True))
    items = [(i, 100 + i) for i in range(0, 40, 3)]
    x, y = ds.batch(items)
    assert x.shape == (len(items), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == ix.label[[i for i, _ in items]].tolist()
    x2, _ = ds.batch(items)
    assert torch.equal(x, x2)  # same seeds, same augmentation
    x3, _ = ds.batch([(i, s + 1) for i, s in items])
    assert not torch.equal(x, x3)
    a, _ = ds.batch(items[:5])
    b, _ = ds.batch(items[5:])
    assert torch.equal(torch.cat([a, b]), x)  # a sample does not depend on the batch it falls in
    # batched cuCIM reads return exactly what single reads return
    ev = TileDataset(ix, BatchSpec(32))
    assert torch.equal(TileDataset(ix, BatchSpec(32), batched_reads=True).batch(items)[0], ev.batch(items)[0])
    # batch-by-transform: several crops per read
    x4, y4 = TileDataset(ix, BatchSpec(32, augment=True, crops=4)).batch(items[:3])
    assert x4.shape == (12, 3, 32, 32) and (y4[:4] == y4[0]).all()


def test_eval_batches_are_the_area_resize_of_the_slide_pixels(synth_index):
    """Against an independent reference: the reader's pixels through torch's adaptive average pooling
    (what MONAI's Resize(mode="area") does)."""
    from hpcfl.wsi.dataset import TileDataset

    ix = load_index(synth_index / "index")
    ds = TileDataset(ix, BatchSpec(24))
    items = [(i, 0) for i in range(6)]
    x, _ = ds.batch(items)
    raw = torch.from_numpy(np.stack([ds.read(i) for i, _ in items])).permute(0, 3, 1, 2).double() / 255
    assert (x.double() - torch.nn.functional.adaptive_avg_pool2d(raw, 24)).abs().max() < 1e-6


def test_loader_workers_give_the_same_batches(synth_index):
    from hpcfl.wsi.dataset import OrderSampler, TileDataset, as_is

    ix = load_index(synth_index / "index")
    sampler = OrderSampler()
    sampler.items = [(i, 7 * i) for i in range(24)]
    ds = TileDataset(ix, BatchSpec(32, augment=True))
    out = []
    for workers in (0, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers, collate_fn=as_is)
        out.append(torch.cat([x for x, _ in dl]))
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[0][:8], ds.batch(sampler.items[:8])[0])


def test_site_epochs_are_reproducible_whatever_the_feed(synth_index, tmp_path):
    runs = {}
    for name, opts in (("thread", {"prefetch": 2}), ("inline", {}), ("workers", {"loader_workers": 2})):
        td = tile_data(synth_index, tmp_path, **opts)
        try:
            assert td.plan.decode == "cpu" and not td.plan.on_gpu and td.plan.pin == torch.cuda.is_available()
            assert td.prefetch == {"thread": 2, "inline": 0 if not torch.cuda.is_available() else 2}.get(name, td.prefetch)
            e0 = list(td.epoch_batches(1, 0, 16))
            e1 = list(td.epoch_batches(1, 1, 16))
            assert len(e0) == td.steps_per_epoch(16)
            runs[name] = (torch.cat([x for x, _ in e0]), torch.cat([y for _, y in e0]), torch.cat([x for x, _ in e1]))
            val = list(td.val_batches(32))
            assert sum(len(y) for _, y in val) == len(td.val_idx) and val[0][0].shape[1:] == (3, 32, 32)
        finally:
            td.close()
    for name in ("inline", "workers"):
        assert all(torch.equal(a, b) for a, b in zip(runs["thread"], runs[name])), name
    assert not torch.equal(runs["thread"][0], runs["thread"][2])  # the next epoch is reshuffled


def test_stopping_mid_epoch_stops_the_prefetch_thread(synth_index, tmp_path):
    import threading

    td = tile_data(synth_index, tmp_path, prefetch=2)
    before = threading.active_count()
    g = td.epoch_batches(1, 0, 8)
    next(g)
    assert threading.active_count() == before + 1
    g.close()  # what the trainer does after its planned steps
    assert threading.active_count() == before
    td.close()


def test_smart_cache_and_crops(synth_index, tmp_path):
    td = tile_data(synth_index, tmp_path, smart_cache={"cache_num": 16})
    try:
        b = list(td.epoch_batches(1, 0, 8))
        assert [len(y) for _, y in b] == [8, 8] and b[0][0].shape == (8, 3, 32, 32)
    finally:
        td.close()
    td = tile_data(synth_index, tmp_path, crops_per_read=2, batched_reads=True)
    x, y = next(iter(td.epoch_batches(1, 0, 8)))
    assert x.shape == (16, 3, 32, 32) and td.num_train == 2 * len(td.train_idx)
    xv, _ = next(iter(td.val_batches(8)))
    assert xv.shape == (8, 3, 32, 32)  # evaluation: one centre crop per tile
    td.close()


@pytest.mark.parametrize("tiles,match", [
    ({"decode_device": "cuda"}, "data.tiles.decode_device: cuda, but torch sees no usable CUDA device"),
    ({"crops_per_read": 2, "input_size": 96}, "data.tiles.crops_per_read: crops of input_size 96 need tiles"),
    ({"smart_cache": {"cache_num": 8}, "loader_workers": 1}, "data.tiles.smart_cache: use it with"),
])
def test_site_start_refuses_in_one_line(synth_index, tmp_path, tiles, match):
    if "decode_device" in tiles and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the tests/gpu tier covers decode_device: cuda")
    with pytest.raises(ConfigError, match=match) as e:
        tile_data(synth_index, tmp_path, **tiles)
    assert "\n" not in str(e.value)


def test_simulated_sites_share_index_and_readers(synth_index, tmp_path):
    from hpcfl.wsi.readers import shared_reader

    a = tile_data(synth_index, tmp_path, site=0)
    b = tile_data(synth_index, tmp_path, site=1)
    assert a.index is b.index is shared_index(synth_index / "index")  # one copy per process
    assert not set(a.train_idx) & set(b.train_idx)
    next(iter(a.epoch_batches(1, 0, 4)))
    path = a.index.slide_paths[int(a.index.slide[a.train_idx[0]])]
    assert shared_reader(path) is shared_reader(path)  # one open reader per slide
    with pytest.raises(ValueError):
        a.index.x[0] = 1  # shared, so read-only
    a.close()
    b.close()


def test_the_gpu_plan_wiring_with_a_numpy_stand_in_for_cupy(synth_index, monkeypatch):
    """No GPU here: CuPy is replaced by NumPy and cuCIM's device argument dropped, so what runs is the
    GPU plan's own code (per-slide batch reads into one device array, assembly on that module)."""
    import types

    import hpcfl.wsi.dataset as dataset
    import hpcfl.wsi.readers as readers
    from hpcfl.wsi.dataset import TileDataset
    from hpcfl.wsi.feed import FeedPlan

    fake = types.ModuleType("fake_cupy")
    fake.__getattr__ = lambda name: getattr(np, name)
    monkeypatch.setattr(dataset, "array_module", lambda name: fake if name == "cupy" else np)
    monkeypatch.setattr(readers, "_cupy", lambda: fake)
    seen = []

    class DropDevice:
        def __init__(self, img):
            self.img = img

        def read_region(self, *a, device="cpu", **kw):
            seen.append(device)
            return self.img.read_region(*a, **kw)

    ix = load_index(synth_index / "index")
    items = [(i, 50 + i) for i in range(0, 60, 4)]
    for s in {int(ix.slide[i]) for i, _ in items}:
        r = readers.shared_reader(ix.slide_paths[s])
        monkeypatch.setattr(r, "_img", DropDevice(r._img))
    spec = BatchSpec(32, augment=True)
    x, y = TileDataset(ix, spec, plan=FeedPlan("cuda", "cupy", False, 0)).batch(items)
    assert seen and set(seen) == {"cuda"}  # every read asked cuCIM for the GPU, a batch per slide
    xh, yh = TileDataset(ix, spec).batch(items)
    assert torch.equal(x, xh) and torch.equal(y, yh)


def test_gpu_bench_says_plainly_when_there_is_no_gpu(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_tiles.py"), "--json", str(tmp_path / "g.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("gpu_tiles: no GPU: torch sees no CUDA device"), r.stdout + r.stderr
    got = json.loads((tmp_path / "g.json").read_text())
    assert got["gpu"] is False and got["machine"]["cuda_available"] is False


def test_pinning_happens_in_the_rank_s_process_never_in_a_loader_worker(synth_index, monkeypatch):
    """With CUDA initialised in the rank, pinning inside a forked DataLoader worker fails ("CUDA error:
    initialization error"): here pinning raises in a worker, and records where it ran in the parent."""
    from hpcfl.wsi.dataset import OrderSampler, TileDataset, as_is
    from hpcfl.wsi.feed import FeedPlan

    pinned_here = []
    real_empty = torch.empty

    def in_worker():
        return torch.utils.data.get_worker_info() is not None

    def empty(*shape, pin_memory=False, **kw):
        if pin_memory:
            if in_worker():
                raise RuntimeError("CUDA error: initialization error (pinned in a forked DataLoader worker)")
            pinned_here.append("empty")
        return real_empty(*shape, **kw)

    def pin_memory(self, *a, **kw):
        if in_worker():
            raise RuntimeError("CUDA error: initialization error (pinned in a forked DataLoader worker)")
        pinned_here.append("pin_memory")
        return self

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    ix = load_index(synth_index / "index")
    ds = TileDataset(ix, BatchSpec(32, augment=True), plan=FeedPlan(pin=True, device=0))
    sampler = OrderSampler()
    sampler.items = [(i, 7 * i) for i in range(16)]
    dl = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2, collate_fn=as_is,
                                     multiprocessing_context="fork")
    got = torch.cat([x for x, _ in dl])  # raises here if a worker pinned
    assert torch.equal(got, ds.batch(sampler.items)[0])
    assert pinned_here == ["empty", "pin_memory"]  # the rank's own batch (no workers) is pinned, in the rank


def test_gpu_decoding_never_gets_a_one_location_batch(monkeypatch):
    """cuCIM decodes a multi-location read with nvJPEG but one location with libjpeg-turbo: a tile's pixels
    would depend on how its batch was split. A fake cuCIM image fails a one-location GPU read."""
    from hpcfl.wsi import readers

    class FakeCuImage:
        def __init__(self):
            self.calls = []

        def read_region(self, location, size, level, device="cpu", num_workers=0, batch_size=1):
            many = isinstance(location, list)
            n = len(location) if many else 1
            self.calls.append((n, device))
            if device != "cpu" and n < 2:
                raise AssertionError("a one-location read on the GPU: decoded by libjpeg-turbo, not nvJPEG")
            locs = location if many else [location]
            tiles = np.stack([np.full((size[1], size[0], 4), x % 251, np.uint8) for x, _ in locs])
            return iter([tiles]) if many else tiles[0]

    r = readers.CuCIMReader.__new__(readers.CuCIMReader)
    r.path, r._img, r._dims, r._down = "fake.tiff", FakeCuImage(), [(1024, 1024)], [1.0]
    monkeypatch.setattr(readers, "_cupy", lambda: np)  # NumPy stands in for CuPy
    one = r.read_batch([(7, 0)], 0, (4, 4), device="cuda")
    assert one.shape == (1, 4, 4, 3) and (one == 7).all() and one.flags.c_contiguous
    three = r.read_batch([(1, 0), (2, 0), (3, 0)], 0, (4, 4), device="cuda:1")
    assert three.shape == (3, 4, 4, 3) and [int(t[0, 0, 0]) for t in three] == [1, 2, 3]
    assert all(n >= 2 for n, d in r._img.calls if d != "cpu")
    assert r.read_batch([(5, 0)], 0, (4, 4)).shape == (1, 4, 4, 3)  # the CPU: one decoder whatever the batch
