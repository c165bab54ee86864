"""Whole-batch tile math, the feed plan (device choices and refusals, with fakes), the prefetch thread."""
import threading

import numpy as np
import pytest
import torch

from hpcfl.errors import ConfigError, DependencyError, HpcflError
from hpcfl.wsi.arrays import to_torch
from hpcfl.wsi.batch import (BatchSpec, area_bounds, assemble, crop_offsets, dihedral_codes, item_draws, resize_area,
                             splitmix64, to_chw)
from hpcfl.wsi.feed import FeedPlan, plan_feed, prefetched


def test_splitmix64_gives_the_published_sequence():
    # SplitMix64 seeded with 0: outputs 1 and 2 (state advanced by the golden gamma each time)
    out = splitmix64(np.array([0, 0x9E3779B97F4A7C15], np.uint64))
    assert [hex(int(v)) for v in out] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4"]


def test_draws_depend_only_on_the_item_seed():
    a = item_draws([5, 9, 11], crops=2)
    b = item_draws([11, 5], crops=2)  # another batch, another position
    assert a.shape == (6,) and np.array_equal(a[4:6], b[0:2]) and np.array_equal(a[0:2], b[2:4])
    assert a[0] != a[1]  # crops of one tile get their own draws
    codes = dihedral_codes(item_draws(np.arange(8000), 1))
    counts = np.bincount(codes, minlength=8)
    assert counts.min() > 850 and counts.max() < 1150  # the 8 flips/rotations, uniformly
    rows, cols = crop_offsets(item_draws(np.arange(4000), 1), tile=10, size=4)
    assert rows.min() == 0 and rows.max() == 6 and cols.min() == 0 and cols.max() == 6


def test_area_windows_by_hand():
    s, e = area_bounds(7, 2)  # 3.5 pixels per output: [0, 4) and [3, 7)
    assert s.tolist() == [0, 3] and e.tolist() == [4, 7]
    s, e = area_bounds(2, 4)  # upsampling: each input pixel covers two outputs
    assert s.tolist() == [0, 0, 1, 1] and e.tolist() == [1, 1, 2, 2]


def test_resize_area_by_hand_and_against_torch():
    x = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    got = resize_area(np, x, 2)[0, :, :, 0]
    assert got.tolist() == [[2.5, 4.5], [10.5, 12.5]]  # means of the 2x2 blocks
    x = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.uint8).reshape(1, 3, 3, 1)
    got = resize_area(np, x, 2)[0, :, :, 0]  # windows [0, 2) and [1, 3) overlap in the middle
    assert np.allclose(got, [[3.0, 4.0], [6.0, 7.0]])
    rng = np.random.default_rng(0)
    for h, out in ((224, 64), (128, 64), (50, 64), (64, 64), (96, 40), (1100, 64)):  # 1100: sums past uint16
        x = rng.integers(0, 256, (2, h, h, 3), dtype=np.uint8)
        ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2).double(), out)
        got = resize_area(np, x, out, 1 / 255)
        assert got.dtype == np.float32 and got.shape == (2, out, out, 3)
        assert np.abs(got.transpose(0, 3, 1, 2) - ref.numpy() / 255).max() < 1e-6, (h, out)


def test_the_eight_codes_are_the_eight_flips_and_rotations():
    a = np.arange(9, dtype=np.uint8).reshape(3, 3)
    x = np.repeat(a[None, :, :, None], 8, axis=0)  # one image, 8 copies, 1 channel
    got = to_chw(np, x, np.arange(8))[:, 0]
    assert np.array_equal(got[0], a) and np.array_equal(got[1], a[::-1]) and np.array_equal(got[2], a[:, ::-1])
    assert np.array_equal(got[4], a.T) and np.array_equal(got[5], np.rot90(a, 1))
    assert np.array_equal(got[3], np.rot90(a, 2)) and np.array_equal(got[6], np.rot90(a, 3))
    want = {np.rot90(m, k).tobytes() for m in (a, a[:, ::-1]) for k in range(4)}
    assert {g.astype(np.uint8).tobytes() for g in got} == want


def test_assemble_layout_range_crops_and_independence_from_batching():
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    seeds = [3, 1, 4, 1, 5]
    x = assemble(np, tiles, seeds, BatchSpec(8, augment=True))
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.float32 and x.flags.c_contiguous
    assert 0.0 <= x.min() and x.max() <= 1.0
    part = assemble(np, tiles[2:4], seeds[2:4], BatchSpec(8, augment=True))
    assert np.array_equal(part, x[2:4])  # an item's sample does not depend on its batch
    # crops: 3 per tile, each a window of its own tile (turned by its code)
    c = assemble(np, tiles, seeds, BatchSpec(6, augment=True, crops=3))
    assert c.shape == (15, 3, 6, 6)
    for k in range(15):
        src = tiles[k // 3]
        views = [np.rot90(m, r) for m in (src, src[:, ::-1]) for r in range(4)]
        windows = {v[i:i + 6, j:j + 6].tobytes() for v in views for i in range(11) for j in range(11)}
        assert np.round(c[k].transpose(1, 2, 0) * 255).astype(np.uint8).tobytes() in windows
    ev = assemble(np, tiles, seeds, BatchSpec(6, crops=3, train=False))  # one centre crop per tile
    assert np.array_equal(np.round(ev[0] * 255).astype(np.uint8), tiles[0, 5:11, 5:11].transpose(2, 0, 1))
    out = np.full((5, 3, 8, 8), -1, np.float32)
    assert assemble(np, tiles, seeds, BatchSpec(8, augment=True), out=out) is out and np.array_equal(out, x)


@pytest.mark.parametrize("tile,size", [(224, 64), (50, 64), (96, 40)])
def test_augmented_resize_is_the_plain_resize_turned(tile, size):
    """The weights are applied after the turn: right only because they are turn-invariant."""
    rng = np.random.default_rng(2)
    tiles = rng.integers(0, 256, (8, tile, tile, 3), dtype=np.uint8)
    seeds = np.arange(8) * 13
    plain = assemble(np, tiles, seeds, BatchSpec(size))
    turned = assemble(np, tiles, seeds, BatchSpec(size, augment=True))
    codes = dihedral_codes(item_draws(seeds, 1))
    assert len(set(codes.tolist())) > 3
    for k, code in enumerate(codes.tolist()):
        want = to_chw(np, plain[k].transpose(1, 2, 0)[None], [code])[0]
        assert np.array_equal(turned[k], want), code


def test_same_seed_same_tile_same_sample():
    tiles = np.stack([np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)] * 2)
    x = assemble(np, tiles, [7, 7], BatchSpec(8, augment=True))
    assert np.array_equal(x[0], x[1])
    y = assemble(np, tiles, [7, 8], BatchSpec(8, augment=True))
    assert np.array_equal(x[0], y[0])


@pytest.mark.parametrize("kw,error,match", [
    (dict(decode_device="cuda", cuda_available=False), ConfigError, "data.tiles.decode_device: cuda, but torch sees no"),
    (dict(decode_device="cuda", reader_backend="openslide"), ConfigError, "needs data.tiles.backend: cucim"),
    (dict(decode_device="cuda", array_backend="numpy"), ConfigError, "data.array_backend: numpy assembles"),
    (dict(decode_device="cuda", loader_workers=2), ConfigError, "set data.tiles.loader_workers: 0"),
    (dict(decode_device="cuda", cupy_error="CUDARuntimeError: no device"), DependencyError, "CuPy, which is not usable"),
    (dict(array_backend="cupy", cuda_available=False), ConfigError, "data.array_backend: cupy: no usable CUDA"),
    (dict(decode_device="gpu"), ConfigError, "'gpu' is not one of cpu, cuda"),
    (dict(decode_device="cuda", train_device="cpu"), ConfigError, "but train.device: cpu trains on the host"),
])
def test_feed_plan_refuses_in_one_line_naming_the_key(kw, error, match):
    args = dict(decode_device="cpu", array_backend="auto", reader_backend="cucim", loader_workers=0,
                cuda_available=True, device=0, cupy_error=None)
    args.update(kw)
    with pytest.raises(error, match=match) as e:
        plan_feed(**args)
    assert "\n" not in str(e.value) and isinstance(e.value, HpcflError)


def test_feed_plan_choices():
    cpu_only = plan_feed("cpu", "auto", "cucim", 2, cuda_available=False, device=-1)
    assert cpu_only == FeedPlan("cpu", "numpy", False, -1) and cpu_only.cuda_device == "cpu"
    host = plan_feed("cpu", "auto", "openslide", 2, cuda_available=True, device=1)
    assert host == FeedPlan("cpu", "numpy", True, 1) and not host.on_gpu  # pinned host batches
    gpu = plan_feed("cuda", "auto", "cucim", 0, cuda_available=True, device=0)
    assert gpu == FeedPlan("cuda", "cupy", False, 0) and gpu.on_gpu and gpu.cuda_device == "cuda"
    assert plan_feed("cuda", "cupy", "cucim", 0, True, device=3).cuda_device == "cuda:3"
    mixed = plan_feed("cpu", "cupy", "openslide", 0, cuda_available=True, device=0)
    assert mixed == FeedPlan("cpu", "cupy", False, 0)  # CPU decode, GPU assembly
    on_host = plan_feed("cpu", "auto", "cucim", 0, cuda_available=True, device=0, train_device="cpu")
    assert on_host == FeedPlan("cpu", "numpy", False, -1)  # training on the CPU of a GPU machine: nothing pinned


def test_to_torch_shares_memory_on_the_host_and_through_dlpack():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data

    class DeviceArray:  # anything that speaks DLPack but is not a NumPy array (CuPy on a GPU)
        def __init__(self, arr):
            self.arr = arr

        def __dlpack__(self, **kw):
            return self.arr.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.arr.__dlpack_device__()

    t = to_torch(DeviceArray(a))
    assert t.data_ptr() == a.ctypes.data and t.shape == (3, 4)


def test_prefetch_yields_in_order_raises_where_it_failed_and_stops_when_closed():
    assert list(prefetched(iter(range(10)), depth=2)) == list(range(10))
    assert list(prefetched(iter(range(3)), depth=0)) == [0, 1, 2]

    class Bad(HpcflError):
        pass

    def failing():
        yield 1
        yield 2
        raise Bad("slide-007.tiff: cannot read region")

    got = []
    with pytest.raises(Bad, match="slide-007"):
        for v in prefetched(failing(), depth=3):
            got.append(v)
    assert got == [1, 2]

    finished = threading.Event()
    before = threading.active_count()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            finished.set()

    g = prefetched(endless(), depth=2, setup=lambda: None)
    assert [next(g) for _ in range(5)] == [0, 1, 2, 3, 4]
    g.close()
    assert finished.is_set() and threading.active_count() == before  # the thread ended, the source was closed
