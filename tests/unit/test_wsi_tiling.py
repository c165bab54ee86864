"""Tiling, the Feather index, slide ownership and sharding, and the cuCIM cache (batches: test_wsi_dataset.py)."""
import json
import subprocess
import sys

import numpy as np
import pyarrow.feather as feather
import pytest
from PIL import Image

from conftest import ROOT, hpcfl
from hpcfl.config import from_dict
from hpcfl.data import epoch_shard
from hpcfl.wsi.index import load_index, partition_slides, site_tiles
from hpcfl.wsi.synth import synthesize_slides, write_pyramid
from hpcfl.wsi.tiling import TilingParams, tile_directory

S = 2048  # slide side
R = 600  # disc radius


def disc_slide(path, with_mask=True):
    """White glass with a disc of tissue: left half class 2 (dark purple), right half class 1 (pink)."""
    yy, xx = np.mgrid[:S, :S]
    disc = (yy - S // 2) ** 2 + (xx - S // 2) ** 2 < R ** 2
    img = np.full((S, S, 3), 240, np.uint8)
    img[disc] = (200, 80, 150)
    img[disc & (xx < S // 2)] = (120, 40, 140)
    write_pyramid(path, img, tile=256, min_level_size=256)
    if with_mask:
        m = np.zeros((S // 8, S // 8), np.uint8)
        d8 = disc[::8, ::8]
        m[d8] = 1
        m[d8 & (xx[::8, ::8] < S // 2)] = 2
        Image.fromarray(m).save(path.with_name(path.stem + ".mask.png"))
    return disc


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    disc = disc_slide(d / "disc.tiff")
    (d / "empty.tiff").write_bytes(b"")
    write_pyramid(d / "blank.tiff", np.full((1024, 1024, 3), 240, np.uint8), tile=256, min_level_size=256)
    good = (d / "disc.tiff").read_bytes()
    (d / "truncated.tiff").write_bytes(good[: len(good) // 3])
    (d / "notaslide.svs").write_text("hello")
    out = tmp_path_factory.mktemp("index")
    done, failures = tile_directory(d, out, TilingParams(level=1, tile_size=128, stride=128),
                                    classes=["stroma", "tumor"], progress=False)
    return d, out, disc, done, failures


def test_tissue_labels_match_known_geometry(tiled):
    _, out, disc, done, _ = tiled
    t = feather.read_table(out / "disc.feather", memory_map=True)
    x, y = t["x"].to_numpy(), t["y"].to_numpy()
    labels = t["tile_label"].cast("string").to_pylist()
    side0 = 256  # 128 px at level 1
    truth = np.array([disc[b:b + side0, a:a + side0].mean() for a, b in zip(x, y)])
    expected = np.where(truth < 0.05, "white_background", np.where(truth >= 0.8, "tissue", "partial_tissue"))
    assert (np.array(labels) == expected).mean() >= 0.95
    assert {"white_background", "partial_tissue", "tissue"} <= set(labels)
    # classes from the mask: tiles fully in the left half are "tumor" (mask value 2)
    names = np.array(t["class_name"].cast("string").to_pylist())
    tissue = np.array(labels) == "tissue"
    assert set(names[tissue & (x + side0 <= S // 2)]) == {"tumor"}
    assert set(names[tissue & (x >= S // 2)]) == {"stroma"}
    assert done[0]["slide_id"] == "disc" and done[0]["tissue"] == int(tissue.sum())


def test_feather_index_contents(tiled):
    _, out, _, _, _ = tiled
    t = feather.read_table(out / "disc.feather", memory_map=True)
    assert t.column_names == ["slide_id", "path", "x", "y", "level", "size", "row", "col", "tissue_fraction",
                              "tile_label", "class_id", "class_name", "class_fraction"]
    assert t.num_rows == (S // 2 // 128) ** 2
    assert set(t["level"].to_pylist()) == {1} and set(t["size"].to_pylist()) == {128}
    # level-0 coordinates on the level-1 grid: multiples of the downsample (where both backends agree)
    assert (t["x"].to_numpy() % 256 == 0).all() and t["x"].to_numpy().max() == S - 256
    meta = json.loads((out / "index.json").read_text())
    assert meta["classes"] == ["stroma", "tumor"] and meta["params"]["tile_size"] == 128
    thumb = Image.open(out / "disc.thumbnail.png")
    assert thumb.size[0] == 1024 and 1024 < thumb.size[1] <= 1084  # the detection level, tiles drawn on it, a legend
    assert np.asarray(thumb)[..., 1].max() > 0


def test_bad_slides_are_named_and_the_rest_is_tiled(tiled):
    d, out, _, done, failures = tiled
    assert [s["slide_id"] for s in done] == ["disc"]
    assert len(failures) == 4
    by = {f.split(":")[0].rsplit("/", 1)[-1]: f for f in failures}
    assert "no tissue found" in by["blank.tiff"]
    assert "not a slide file (empty" in by["empty.tiff"]
    assert "cannot open slide" in by["notaslide.svs"]
    assert by["truncated.tiff"].startswith(str(d / "truncated.tiff"))
    assert all("\n" not in f for f in failures)


def test_tile_command_exit_code_and_missing_dir(tiled, tmp_path):
    d, _, _, _, _ = tiled
    r = hpcfl("tile", d, "--out", tmp_path / "idx", "--level", "1", "--tile-size", "128")
    assert r.returncode == 1 and "disc: " in r.stdout and "(1 slides tiled, 4 failed)" in r.stdout
    assert r.stderr.count("hpcfl: ") == 4
    r = hpcfl("tile", tmp_path / "nope", "--out", tmp_path / "idx2")
    assert r.returncode == 2 and "slides directory not found" in r.stderr


def test_geojson_annotations_give_classes(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    disc_slide(d / "a.tiff", with_mask=False)
    square = [[[0, 0], [S // 2, 0], [S // 2, S], [0, S], [0, 0]]]  # the left half
    (d / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"classification": {"name": "Tumor"}}}]}))
    done, failures = tile_directory(d, tmp_path / "i", TilingParams(level=1, tile_size=128), progress=False)
    assert not failures
    t = feather.read_table(tmp_path / "i" / "a.feather")
    names = np.array(t["class_name"].cast("string").to_pylist())
    x = t["x"].to_numpy()
    tissue = np.array(t["tile_label"].cast("string").to_pylist()) == "tissue"
    assert set(names[tissue & (x + 256 <= S // 2)]) == {"Tumor"} and set(names[tissue & (x >= S // 2)]) == {""}


@pytest.mark.parametrize("how", ["slide", "dirichlet", "quantity"])
def test_sites_own_whole_disjoint_slides(how):
    parts = partition_slides(12, 3, how, seed=1, alpha=0.5, slide_class=np.arange(12) % 4)
    allp = np.concatenate(parts)
    assert sorted(allp) == list(range(12)) and all(len(p) >= 2 for p in parts)
    again = partition_slides(12, 3, how, seed=1, alpha=0.5, slide_class=np.arange(12) % 4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # seeded


@pytest.fixture(scope="module")
def synth_index(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthesize_slides(d / "slides", n_slides=6, size=2048, seed=3)
    tile_directory(d / "slides", d / "index", TilingParams(level=1, tile_size=64), progress=False)
    return d


def test_site_tiles_and_rank_shards(synth_index):
    cfg = from_dict({"sites": [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 3}],
                     "data": {"name": "tiles", "val_fraction": 0.34,
                              "tiles": {"index_dir": str(synth_index / "index")}}})
    ix = load_index(synth_index / "index")
    owned = []
    for s in range(2):
        tr, va, rec = site_tiles(ix, cfg, s, 2)
        assert not set(rec["train_slides"]) & set(rec["val_slides"])  # split by slide
        owned.append(set(rec["train_slides"]) | set(rec["val_slides"]))
        assert set(np.unique(ix.slide[tr])) | set(np.unique(ix.slide[va])) == \
            {ix.slide_ids.index(x) for x in owned[-1]}
        k = cfg.sites[s].ranks
        shards = [epoch_shard(tr, r, k, 0, 1, 0, s) for r in range(k)]
        assert len({len(x) for x in shards}) == 1  # same number of steps on every rank
        flat = np.concatenate(shards)
        assert len(np.unique(flat)) == len(flat)  # no tile on two ranks
        assert len(tr) - len(flat) < k  # at most k-1 dropped in an epoch, different ones next epoch
    assert not owned[0] & owned[1]  # a hospital never sees another's slides
    assert owned[0] | owned[1] == set(ix.slide_ids)


CACHE_PROBE = r"""
import json, os, sys, numpy as np
from hpcfl.wsi.cache import configure_cache
path, kind = sys.argv[1], sys.argv[2]
configure_cache(kind, 64, os.path.dirname(path))
from hpcfl.wsi.readers import open_slide
r = open_slide(path, "cucim")
a = r.read_region(300, 300, 0, (200, 200))          # unaligned: spans four file tiles
size = os.path.getsize(path)
with open(path, "r+b") as f:                         # destroy the pixels on disk, same inode
    f.seek(4096); f.write(b"\0" * (size - 4096))
if kind == "shared_memory":
    pid = os.fork()
    if pid == 0:                                     # a forked loader worker reads through the shared cache
        try:
            b = r.read_region(300, 300, 0, (200, 200)); os._exit(0 if np.array_equal(a, b) else 3)
        except Exception:
            os._exit(4)
    _, st = os.waitpid(pid, 0); print(json.dumps({"same": os.WEXITSTATUS(st) == 0})); sys.exit(0)
try:
    b = r.read_region(300, 300, 0, (200, 200)); print(json.dumps({"same": bool(np.array_equal(a, b))}))
except Exception as e:
    print(json.dumps({"same": False, "error": str(e)[:100]}))
"""


@pytest.mark.parametrize("kind,served_from_cache", [("per_process", True), ("shared_memory", True), ("nocache", False)])
def test_cucim_cache_takes_effect(tmp_path, kind, served_from_cache):
    """Proved by effect: after the first read the file's pixels are destroyed; only a cached read survives."""
    disc_slide(tmp_path / "s.tiff", with_mask=False)
    r = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / "s.tiff"), kind],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["same"] is served_from_cache


def test_array_backend_is_chosen_once():
    from hpcfl.errors import DependencyError
    from hpcfl.wsi.arrays import array_module, resolved_name, saturation, to_chw_float

    assert array_module("numpy") is np
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    assert to_chw_float(rgb).shape == (3, 4, 4) and float(saturation(rgb).min()) == 1.0
    try:
        import cupy  # noqa: F401
        cupy.zeros(1).sum()
        has_gpu = True
    except Exception:
        has_gpu = False
    assert resolved_name("auto") == ("cupy" if has_gpu else "numpy")
    if not has_gpu:
        with pytest.raises(DependencyError, match="cupy requested but not usable"):
            array_module("cupy")
