"""Synthetic slides and the pyramid writer: both reader backends agree, masks match pixels,
classes differ by texture rather than by mean colour, and a real histology image round-trips."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from hpcfl.wsi.readers import open_slide
from hpcfl.wsi.synth import MASK_BACKGROUND, TISSUE_CLASSES, SlideInfo, synthesize_slides, write_pyramid

SIZE = 2048
TILE = 128  # analysis tiles at level 0: 16 x 16 mask cells at mask_downsample 8


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize_slides(out, n_slides=8, size=SIZE, seed=0)


def read_level(reader, level):
    w, h = reader.level_dimensions(level)
    return reader.read_region(0, 0, level, (w, h))


def regions(w, h, d):
    """(x, y, (w, h)) in level-0 pixels for a level of w x h and downsample d: a corner, regions
    unaligned to tiles, regions touching the right/bottom edges, all inside the level.

    x and y are multiples of d: OpenSlide interpolates a fractional level position where cuCIM
    floors it, so only whole level pixels can match exactly. Outside the image the backends differ
    too (an Aperio file reads white in cuCIM, transparent, hence black, in OpenSlide)."""
    return [(0, 0, (64, 64)), (d * 37, d * 91, (min(300, w - 37), min(200, h - 91))),
            (d * (w - 97), d * 5, (97, 130)), (d * 3, d * (h - 41), (min(255, w - 3), 41)),
            (d * (w - 50), d * (h - 60), (50, 60))]


def assert_backends_agree(path, min_levels):
    cu, os_ = open_slide(path, "cucim"), open_slide(path, "openslide")
    with cu, os_:
        assert cu.level_count == os_.level_count >= min_levels
        for lvl in range(cu.level_count):
            assert cu.level_dimensions(lvl) == os_.level_dimensions(lvl)
            assert cu.level_downsample(lvl) == pytest.approx(os_.level_downsample(lvl)) == 2.0 ** lvl
            w, h = cu.level_dimensions(lvl)
            d = int(cu.level_downsample(lvl))
            for x, y, size in regions(w, h, d):
                a, b = cu.read_region(x, y, lvl, size), os_.read_region(x, y, lvl, size)
                assert a.shape == b.shape == (size[1], size[0], 3) and a.dtype == b.dtype == np.uint8
                assert np.array_equal(a, b), f"{path.name} level {lvl} region {(x, y, size)} differs"
            assert np.array_equal(read_level(cu, lvl), read_level(os_, lvl))
        return read_level(cu, 0)


def test_slides_round_trip_through_both_backends(slides):
    _, infos = slides
    for s in infos:
        assert_backends_agree(s.path, min_levels=3)


def test_manifest_masks_and_class_coverage(slides):
    out, infos = slides
    doc = json.loads((out / "slides.json").read_text())
    assert doc["classes"] == list(TISSUE_CLASSES) and len(TISSUE_CLASSES) >= 3
    assert (doc["mask_downsample"], doc["tile"], doc["seed"]) == (8, 256, 0)
    assert [d["slide_id"] for d in doc["slides"]] == [f"slide-{i:03d}" for i in range(8)]
    seen = {c: 0 for c in TISSUE_CLASSES}
    for s, d in zip(infos, doc["slides"]):
        assert isinstance(s, SlideInfo) and s.path.name == d["file"] and s.mask_path.name == d["mask"]
        assert (s.width, s.height) == (d["width"], d["height"]) == (SIZE, SIZE)
        mask = np.asarray(Image.open(s.mask_path))
        assert mask.dtype == np.uint8 and mask.shape == (SIZE // 8, SIZE // 8)
        present = tuple(TISSUE_CLASSES[v - 1] for v in np.unique(mask) if v != MASK_BACKGROUND)
        assert present == s.classes_present == tuple(d["classes_present"])
        assert len(present) >= 2, f"{s.slide_id} shows one class only"
        assert 0.35 <= (mask != MASK_BACKGROUND).mean() <= 0.65
        for c in present:
            seen[c] += 1
    assert min(seen.values()) >= 2, seen


def test_same_seed_same_pixels_other_seed_other_pixels(slides, tmp_path):
    _, infos = slides

    def level0(path):
        with open_slide(path, "cucim") as r:
            return read_level(r, 0)

    # A slide depends on (seed, index, size) only, so a shorter run reproduces the first slides.
    again = synthesize_slides(tmp_path / "again", n_slides=2, size=SIZE, seed=0)
    other = synthesize_slides(tmp_path / "other", n_slides=2, size=SIZE, seed=1)
    for i in range(2):
        assert np.array_equal(level0(again[i].path), level0(infos[i].path))
        assert np.array_equal(np.asarray(Image.open(again[i].mask_path)), np.asarray(Image.open(infos[i].mask_path)))
        assert np.mean(level0(other[i].path) != level0(infos[i].path)) > 0.5
    # Rerunning over existing files replaces them with the same content.
    rerun = synthesize_slides(tmp_path / "again", n_slides=2, size=SIZE, seed=0)
    assert np.array_equal(level0(rerun[1].path), level0(infos[1].path))
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "slide-000.mask.png", "slide-000.tiff", "slide-001.mask.png", "slide-001.tiff", "slides.json"]


def test_mask_matches_pixels(slides):
    _, infos = slides
    for s in infos:
        with open_slide(s.path, "cucim") as r:
            rgb = read_level(r, 0)
        mask = np.repeat(np.repeat(np.asarray(Image.open(s.mask_path)), 8, 0), 8, 1)
        near_white = rgb.min(axis=2) >= 215
        grey = (rgb.max(axis=2).astype(int) - rgb.min(axis=2)) <= 12  # glass is unstained
        bg = mask == MASK_BACKGROUND
        assert (near_white & grey)[bg].mean() > 0.97, s.slide_id
        assert (~near_white)[~bg].mean() > 0.97, s.slide_id


def class_tiles(infos):
    """(class id, slide index, RGB tile) for every level-0 TILE x TILE tile whose mask is one class."""
    out = []
    k = TILE // 8
    for i, s in enumerate(infos):
        with open_slide(s.path, "openslide") as r:
            rgb = read_level(r, 0)
        mask = np.asarray(Image.open(s.mask_path))
        for ty in range(0, mask.shape[0] - k + 1, k):
            for tx in range(0, mask.shape[1] - k + 1, k):
                m = mask[ty:ty + k, tx:tx + k]
                if m.min() == m.max() != MASK_BACKGROUND:
                    out.append((int(m[0, 0]), i, rgb[ty * 8:ty * 8 + TILE, tx * 8:tx * 8 + TILE]))
    return out


def coherence(tile):
    """Structure-tensor coherence: ~1 for oriented fibres, ~0 for isotropic texture."""
    g = ndi.gaussian_filter(tile.astype(np.float32).mean(axis=2), 1.0)
    gy, gx = np.gradient(g)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    return float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-9))


def nucleus_area(tile):
    """Mean area (px) of dark blobs under the tile's own Otsu threshold: nucleus size, whatever the stain strength."""
    from skimage.filters import threshold_otsu

    g = tile.astype(np.float32).mean(axis=2)
    lab, _ = ndi.label(g < threshold_otsu(g))
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= 10]
    return float(areas.mean()) if areas.size else 0.0


def test_classes_differ_by_texture_not_by_mean_colour(slides):
    _, infos = slides
    tiles = class_tiles(infos)
    cls = np.array([t[0] for t in tiles])
    slide = np.array([t[1] for t in tiles])
    mean_rgb = np.array([t[2].reshape(-1, 3).mean(axis=0) for t in tiles])
    for c in range(1, len(TISSUE_CLASSES) + 1):
        assert (cls == c).sum() >= 20, f"too few whole-class tiles of {TISSUE_CLASSES[c - 1]}"
        # Stain varies between slides: each class's mean colour moves from slide to slide.
        per_slide = np.array([mean_rgb[(cls == c) & (slide == i)].mean(axis=0)
                              for i in np.unique(slide[cls == c])])
        assert np.ptp(per_slide, axis=0).max() > 15
    stroma, tumor, lymph, necrosis = (TISSUE_CLASSES.index(n) + 1 for n in ("stroma", "tumor", "lymphocytes", "necrosis"))
    for a, b, feature in ((stroma, necrosis, coherence), (tumor, lymph, nucleus_area)):
        ca, cb = mean_rgb[cls == a], mean_rgb[cls == b]
        # Mean colour: the ranges overlap in every channel and a nearest-centroid rule often errs.
        assert all(max(ca[:, j].min(), cb[:, j].min()) < min(ca[:, j].max(), cb[:, j].max()) for j in range(3))
        x = np.concatenate([ca, cb])
        truth = np.r_[np.zeros(len(ca)), np.ones(len(cb))]
        pred = np.linalg.norm(x - cb.mean(0), axis=1) < np.linalg.norm(x - ca.mean(0), axis=1)
        assert np.mean(pred != truth) > 0.1, (TISSUE_CLASSES[a - 1], TISSUE_CLASSES[b - 1])
        # Texture: one feature separates them on average and nearly tile by tile.
        fa = np.array([feature(t[2]) for t in tiles if t[0] == a])
        fb = np.array([feature(t[2]) for t in tiles if t[0] == b])
        assert fa.mean() > 2 * fb.mean()
        cut = (fa.mean() + fb.mean()) / 2
        assert (np.sum(fa > cut) + np.sum(fb <= cut)) / (len(fa) + len(fb)) > 0.95


@pytest.mark.parametrize("suffix,aperio,vendor", [(".tiff", False, "generic-tiff"), (".svs", True, "aperio")])
def test_real_histology_image_round_trips(tmp_path, suffix, aperio, vendor):
    import openslide
    from skimage.data import immunohistochemistry

    img = np.tile(immunohistochemistry(), (2, 2, 1))  # 1024 x 1024 RGB
    path = tmp_path / f"ihc{suffix}"
    assert write_pyramid(path, img, tile=256, aperio=aperio, mpp=0.25, min_level_size=256) == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    level0 = assert_backends_agree(path, min_levels=3)
    assert np.abs(level0.astype(int) - img).mean() < 6
    with open_slide(path, "openslide") as r:  # reduced levels are 2x2 means of the one above
        half = img.reshape(512, 2, 512, 2, 3).mean(axis=(1, 3))
        assert np.abs(read_level(r, 1).astype(float) - half).mean() < 6
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == vendor
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    if aperio:
        from cucim import CuImage

        assert CuImage(str(path)).metadata["aperio"]["MPP"] == "0.2500"


def test_write_pyramid_rejects_bad_input_and_overwrites(tmp_path):
    path = tmp_path / "x.tiff"
    with pytest.raises(ValueError):
        write_pyramid(path, np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError):
        write_pyramid(path, np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError):
        write_pyramid(path, np.zeros((64, 64, 3), np.uint8), tile=100)
    assert not path.exists()
    assert write_pyramid(path, np.full((300, 200, 3), 10, np.uint8), tile=64, min_level_size=512) == 1
    assert write_pyramid(path, np.full((300, 200, 3), 200, np.uint8), tile=64, min_level_size=64) == 2
    with open_slide(path, "openslide") as r:
        assert r.level_count == 2 and r.level_dimensions(1) == (100, 150)
        assert abs(int(r.read_region(0, 0, 0, (8, 8)).mean()) - 200) <= 2


def test_slides_synthesized_with_other_settings_are_made_again_and_nothing_else_is_touched(tmp_path, capsys):
    from hpcfl.config import from_dict
    from hpcfl.wsi.prepare import prepare_tiles, stale_synthesis
    from hpcfl.wsi.synth import synthesize_slides

    slides = tmp_path / "slides"
    synthesize_slides(slides, n_slides=2, size=512, seed=0, progress=False)
    (slides / "notes.txt").write_text("a user's file")

    def cfg(n):
        return from_dict({"sites": [{"name": "a"}], "data": {"name": "tiles", "tiles": {
            "slides_dir": str(slides), "index_dir": str(tmp_path / "index"), "level": 0, "tile_size": 64,
            "synthesize": {"slides": n, "size": 512, "seed": 0}}}})

    assert stale_synthesis(slides, cfg(2).data.tiles.synthesize) == ""
    assert stale_synthesis(slides, cfg(3).data.tiles.synthesize) == "2 synthesized slides of 512 px, seed 0"
    assert stale_synthesis(tmp_path / "nothing", cfg(3).data.tiles.synthesize) == ""  # not synthesized: left alone
    prepare_tiles(cfg(3), progress=False)
    assert "holds 2 synthesized slides of 512 px, seed 0; data.tiles.synthesize asks for 3" in capsys.readouterr().err
    assert sorted(p.name for p in slides.glob("*.tiff")) == ["slide-000.tiff", "slide-001.tiff", "slide-002.tiff"]
    assert (slides / "notes.txt").read_text() == "a user's file"
    index = json.loads((tmp_path / "index" / "index.json").read_text())
    assert index["slides"] and len(index["slides"]) == 3  # the index follows the new slides
