"""task segment: Dice from summed counts (hand-computed), the 3D and tile data, and bad segmentation input.

Every bad input is one DataError line naming the file (what `hpcfl launch` prints for it: rank 0 checks
datalists and masks before the sites start; a site rank checks label values where it loads them).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpcfl.config import from_dict
from hpcfl.errors import ConfigError, DataError
from hpcfl.tasks.segment import metrics as SM


# -- metrics: hand-computed -----------------------------------------------------------------------------------------
def test_dice_from_a_confusion_matrix_by_hand():
    label = np.array([0, 1, 1, 2])
    pred = np.array([0, 1, 2, 2])
    cm = SM.confusion(pred, label, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    # class 0: 2*1/(1+1); class 1: 2*1/(1+2); class 2: 2*1/(2+1)
    assert SM.dice_from_confusion(cm) == [1.0, 2 / 3, 2 / 3]
    assert SM.mean_dice([1.0, 2 / 3, 2 / 3], include_background=False) == 2 / 3
    assert SM.mean_dice([None, 0.5, None], include_background=True) == 0.5  # undefined classes left out


def test_dice_of_summed_parts_is_the_dice_of_the_pooled_pixels_not_the_mean_of_parts():
    # part A (a rank, a site): label [1, 1], pred [1, 0] -> Dice_1 = 2/3; part B: label [0, 0], pred [1, 0] -> 0
    vec_a, vec_b = np.zeros(SM.vector_size(2, False)), np.zeros(SM.vector_size(2, False))
    vec_a[1], vec_b[1] = 1, 1
    vec_a[2:] = SM.confusion(np.array([1, 0]), np.array([1, 1]), 2).ravel()
    vec_b[2:] = SM.confusion(np.array([1, 0]), np.array([0, 0]), 2).ravel()
    assert SM.summarize(vec_a, False, False)["dice"][1] == 2 / 3
    assert SM.summarize(vec_b, False, False)["dice"][1] == 0.0
    pooled = SM.summarize(vec_a + vec_b, False, False)
    assert pooled["dice"][1] == 0.5  # I = 1, P = 2, G = 2; the mean of the parts would be 1/3
    assert pooled["mean_dice"] == 0.5
    assert (pooled["intersection"], pooled["predicted"], pooled["labelled"]) == ([1, 1], [2, 2], [2, 2])
    assert pooled["pixel_accuracy"] == 0.5 and pooled["samples"] == 2


def test_vector_layout_with_hausdorff_sums():
    for c in (1, 2, 5):
        for hd in (False, True):
            assert SM.classes_of(SM.vector_size(c, hd), hd) == c
    with pytest.raises(ValueError):
        SM.classes_of(7, False)
    vec = np.zeros(SM.vector_size(3, True))
    vec[0], vec[1] = 3.0, 2  # loss sum over 2 items
    vec[2:11] = np.eye(3).ravel() * 4
    vec[11:14] = [0.0, 3.0, 9.0]  # HD95 sums per class
    vec[14:17] = [0, 2, 1]  # items counted per class
    out = SM.summarize(vec, True, False)
    assert out["loss"] == 1.5 and out["mean_dice"] == 1.0
    assert out["hd95_per_class"] == [None, 1.5, 9.0]
    assert out["hd95"] == 4.0  # (3 + 9) / (2 + 1) over the foreground classes


def test_torch_accumulate_equals_numpy_counts():
    import torch

    from hpcfl.tasks.segment.task import accumulate, hd95_sums

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 5, generator=g)
    labels = torch.randint(0, 4, (3, 1, 6, 5), generator=g)
    vec = torch.zeros(SM.vector_size(4, False), dtype=torch.float64)
    accumulate(vec, logits, labels, 4, lambda a, b: torch.tensor(2.0), False, False)
    want = SM.confusion(logits.argmax(1).numpy(), labels[:, 0].numpy(), 4)
    assert vec[2:].numpy().reshape(4, 4).tolist() == want.tolist()
    assert vec[0].item() == 6.0 and vec[1].item() == 3  # the batch's mean loss times its items
    # HD95: identical maps are 0 apart; a class absent from both counts nowhere
    lab = torch.zeros(1, 8, 8, dtype=torch.long)
    lab[0, 2:5, 2:5] = 1
    sums = hd95_sums(lab, lab, 3)
    assert sums.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


# -- configs --------------------------------------------------------------------------------------------------------
def seg_cfg(tmp: Path, **extra):
    raw = {"sites": [{"name": "a"}, {"name": "b"}], "task": "segment", "run": {"root": str(tmp / "runs")},
           "data": {"name": "volumes", "volumes": {"root": str(tmp / "vol"),
                                                   "synthesize": {"volumes": 3, "size": [16, 16, 16], "seed": 1}}},
           "segment": {"patch_size": [16, 16, 16], "net_args": {"channels": [4, 8], "strides": [2]},
                       "cache": "none"}}
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v}
    return from_dict(raw)


@pytest.mark.parametrize("change,key", [
    ({"data": {"name": "digits"}}, "data.name"),
    ({"segment": {"patch_size": [18, 16, 16], "net_args": {"channels": [4, 8], "strides": [2, 2]}}},
     "segment.patch_size"),
    ({"segment": {"patch_size": [16, 16]}}, "segment.patch_size"),
    ({"segment": {"intensity_range": [1.0, 0.0]}}, "segment.intensity_range"),
    ({"data": {"name": "tiles", "tiles": {"smart_cache": {"cache_num": 8}}}}, "data.tiles.smart_cache"),
])
def test_segment_config_refusals_name_the_key(tmp_path, change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        seg_cfg(tmp_path, **change)


def test_unknown_monai_network_is_named_with_a_suggestion(tmp_path):
    from hpcfl.tasks import DataSpec
    from hpcfl.tasks.segment.task import build_net

    cfg = seg_cfg(tmp_path, segment={"net": "UNett"})
    with pytest.raises(ConfigError, match="segment.net: 'UNett' .*did you mean 'UNet'"):
        build_net(cfg.segment, DataSpec((1, 16, 16, 16), 3))
    cfg = seg_cfg(tmp_path, segment={"net_args": {"chanels": [4, 8], "strides": [2]}})
    with pytest.raises(ConfigError, match="segment.net_args"):
        build_net(cfg.segment, DataSpec((1, 16, 16, 16), 3))


# -- volumes --------------------------------------------------------------------------------------------------------
def test_synthetic_volumes_are_nifti_with_a_shift_per_site_and_made_once(tmp_path):
    import nibabel as nib

    from hpcfl.tasks.segment import SegmentTask
    from hpcfl.tasks.segment.volumes import datalist_path

    cfg = seg_cfg(tmp_path, data={"name": "volumes", "volumes": {
        "root": str(tmp_path / "vol"), "synthesize": {"volumes": 3, "size": [16, 16, 16], "shift": [0.0, 0.5]}}})
    SegmentTask.prepare_data(cfg)
    docs = [json.loads(datalist_path(cfg, s).read_text()) for s in ("a", "b")]
    assert [len(d["training"]) for d in docs] == [2, 2] and [len(d["validation"]) for d in docs] == [1, 1]
    assert docs[0]["labels"] == {"0": "background", "1": "class1", "2": "class2"}
    img = [nib.load(str(datalist_path(cfg, s).parent / d["training"][0]["image"])) for s, d in zip("ab", docs)]
    lab = nib.load(str(datalist_path(cfg, "a").parent / docs[0]["training"][0]["label"])).get_fdata()
    assert img[0].shape == lab.shape == (16, 16, 16) and set(np.unique(lab)) <= {0, 1, 2}
    lo = [float(i.get_fdata().min()) for i in img]
    assert lo[0] == pytest.approx(0.0, abs=1e-6) and lo[1] == pytest.approx(0.5, abs=1e-6)  # site b: +0.5
    stamp = datalist_path(cfg, "a").stat().st_mtime_ns
    SegmentTask.prepare_data(cfg)
    assert datalist_path(cfg, "a").stat().st_mtime_ns == stamp  # the same settings: not made again


def test_volume_batches_are_patches_by_label_and_reproducible(tmp_path):
    import types

    import torch

    from hpcfl.site.data import SiteRank
    from hpcfl.tasks.segment import SegmentTask

    cfg = seg_cfg(tmp_path, segment={"patch_size": [8, 8, 8], "net_args": {"channels": [4, 8], "strides": [2]},
                                     "cache": "cache", "samples_per_volume": 3})
    SegmentTask.prepare_data(cfg)
    site = types.SimpleNamespace(index=0, name="a", size=1)
    topo = types.SimpleNamespace(sites=[site, None])

    def batches(epoch):
        d = SegmentTask.site_data(cfg, topo, SiteRank(site, 0, 1), tmp_path, {}, torch.device("cpu"))
        assert (d.num_train, d.num_classes, d.input_shape, d.steps_per_epoch(1)) == (2, 3, (1, 8, 8, 8), 2)
        return list(d.epoch_batches(1, epoch, 1)), list(d.val_batches(4))

    (a, val), (b, _) = batches(0), batches(0)
    c, _ = batches(1)
    assert [x.shape for x, _ in a] == [torch.Size([3, 1, 8, 8, 8])] * 2  # 3 patches per volume, 1 volume a step
    assert all(torch.equal(x, y) and torch.equal(l, m) for (x, l), (y, m) in zip(a, b))
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c))
    assert [x.shape for x, _ in val] == [torch.Size([1, 1, 16, 16, 16])]  # whole volumes, for the sliding window
    assert a[0][1].dtype == torch.int64


def _write_nifti(path: Path, arr) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))


def _user_datalist(tmp: Path, label_shape=(8, 8, 8), label_value=1, missing=False):
    d = tmp / "vol" / "a"
    _write_nifti(d / "img0.nii.gz", np.zeros((8, 8, 8), np.float32))
    lab = np.zeros(label_shape, np.uint8)
    lab[0, 0, 0] = label_value
    _write_nifti(d / "lab0.nii.gz", lab)
    entry = {"image": "img0.nii.gz", "label": "gone.nii.gz" if missing else "lab0.nii.gz"}
    (d / "datalist.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"},
                                                 "training": [entry], "validation": [entry]}))
    return from_dict({"sites": [{"name": "a"}], "task": "segment",
                      "data": {"name": "volumes", "volumes": {"root": str(tmp / "vol")}},
                      "segment": {"patch_size": [8, 8, 8], "net_args": {"channels": [4, 8], "strides": [2]}}})


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_datalist_entry_pointing_to_a_missing_file_is_named(tmp_path):
    from hpcfl.tasks.segment import SegmentTask

    cfg = _user_datalist(tmp_path, missing=True)
    with pytest.raises(DataError) as exc:
        SegmentTask.prepare_data(cfg)
    assert one_line(exc).startswith(f"{tmp_path / 'vol' / 'a' / 'gone.nii.gz'}: not found (")
    assert "datalist.json: training[0].label" in str(exc.value)


def test_nifti_image_shape_differing_from_its_label_is_named(tmp_path):
    from hpcfl.tasks.segment import SegmentTask

    cfg = _user_datalist(tmp_path, label_shape=(8, 8, 6))
    with pytest.raises(DataError) as exc:
        SegmentTask.prepare_data(cfg)
    text = one_line(exc)
    assert text.startswith(f"{tmp_path / 'vol' / 'a' / 'img0.nii.gz'}: image shape (8, 8, 8) differs from its "
                           "label's (8, 8, 6)")


def test_label_value_outside_the_declared_classes_is_named_where_it_is_loaded(tmp_path):
    import types

    import torch

    from hpcfl.site.data import SiteRank
    from hpcfl.tasks.segment import SegmentTask

    cfg = _user_datalist(tmp_path, label_value=3)
    SegmentTask.prepare_data(cfg)  # headers are fine: values are checked where the volumes are loaded
    site = types.SimpleNamespace(index=0, name="a", size=1)
    with pytest.raises(DataError) as exc:
        SegmentTask.site_data(cfg, types.SimpleNamespace(sites=[site]), SiteRank(site, 0, 1), tmp_path, {},
                              torch.device("cpu"))
    assert one_line(exc) == (f"{tmp_path / 'vol' / 'a' / 'lab0.nii.gz'}: label value 3 is outside the declared "
                             "classes 0..1 (background, organ)")


def test_a_site_without_a_datalist_is_named(tmp_path):
    from hpcfl.tasks.segment import SegmentTask

    cfg = from_dict({"sites": [{"name": "a"}], "task": "segment",
                     "data": {"name": "volumes", "volumes": {"root": str(tmp_path / "nothing")}}})
    with pytest.raises(DataError) as exc:
        SegmentTask.prepare_data(cfg)
    assert one_line(exc).startswith(f"{tmp_path / 'nothing' / 'a' / 'datalist.json'}: datalist of site 'a' not found")


# -- tile masks -----------------------------------------------------------------------------------------------------
@pytest.fixture
def slide(tmp_path):
    """A slide's path with a 32 x 32 class mask next to it (the slide file itself is never opened here)."""
    from PIL import Image

    raster = np.random.default_rng(0).integers(0, 5, (32, 32)).astype(np.uint8)
    path = tmp_path / "slides" / "slide-000.tiff"
    path.parent.mkdir()
    path.write_bytes(b"")
    Image.fromarray(raster, mode="L").save(path.with_name("slide-000.mask.png"))
    return path, raster


def test_tile_masks_are_sampled_at_tile_resolution(slide):
    from hpcfl.tasks.segment.masks import load_slide_mask, tile_mask
    from hpcfl.wsi.synth import TISSUE_CLASSES

    path, full = slide
    raster, down = load_slide_mask(str(path), (256, 256), TISSUE_CLASSES)
    assert down == 8 and np.array_equal(raster, full)
    m = tile_mask(raster, down, 128.0, 64.0, 64.0, 16)  # a 64-px square at (128, 64) as 16 x 16: 4 px a sample
    want = full[(64 + np.arange(16) * 4 + 2) // 8][:, (128 + np.arange(16) * 4 + 2) // 8]
    assert m.shape == (16, 16) and np.array_equal(m, want)


def _bad_mask(slide, tmp_path, arr):
    from PIL import Image

    p = tmp_path / slide[0].name
    p.write_bytes(b"")
    Image.fromarray(arr.astype(np.uint8), mode="L").save(tmp_path / f"{p.stem}.mask.png")
    return p


def test_mask_shape_differing_from_the_slide_and_its_tiles_is_named(slide, tmp_path):
    from hpcfl.tasks.segment.masks import load_slide_mask
    from hpcfl.wsi.synth import TISSUE_CLASSES

    p = _bad_mask(slide, tmp_path, np.zeros((20, 32)))
    with pytest.raises(DataError) as exc:
        load_slide_mask(str(p), (256, 256), TISSUE_CLASSES)
    assert one_line(exc).startswith(f"{tmp_path / 'slide-000.mask.png'}: a 32x20 mask does not match the 256x256 "
                                    "slide at one downsample")


def test_mask_value_outside_the_declared_classes_is_named(slide, tmp_path):
    from hpcfl.tasks.segment.masks import load_slide_mask

    arr = np.zeros((32, 32))
    arr[3, 3] = 5
    p = _bad_mask(slide, tmp_path, arr)
    with pytest.raises(DataError) as exc:
        load_slide_mask(str(p), (256, 256), ("stroma", "tumor"))
    assert one_line(exc) == (f"{tmp_path / 'slide-000.mask.png'}: label value 5 is outside the declared classes "
                             "0..2 (background, stroma, tumor)")


def test_a_real_slide_without_a_mask_is_named(slide, tmp_path):
    from hpcfl.tasks.segment.masks import load_slide_mask

    p = tmp_path / "scan.tiff"
    p.write_bytes(slide[0].read_bytes())
    with pytest.raises(DataError) as exc:
        load_slide_mask(str(p), (256, 256), ("stroma",))
    assert one_line(exc).startswith(f"{p}: no class mask for task segment (scan.mask.png")


# -- the tile pipeline: two small painted slides with masks, tiled -----------------------------------------------
@pytest.fixture(scope="module")
def painted_index(tmp_path_factory):
    """2 slides of 256 px (tissue: pink on the left 3/4, glass on the right), each with a class mask at 1/8
    (class 1 above the middle, 2 below, 0 on glass), tiled at 32 px, level 0."""
    from PIL import Image

    from hpcfl.wsi.synth import write_pyramid
    from hpcfl.wsi.tiling import TilingParams, tile_directory

    d = tmp_path_factory.mktemp("painted")
    (d / "slides").mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        rgb = np.full((256, 256, 3), 240, np.uint8)
        rgb[:, :192] = (200, 90, 150)
        rgb[128:, :192] = (120, 60, 160)
        rgb = np.clip(rgb.astype(int) + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
        write_pyramid(d / "slides" / f"s{k}.tiff", rgb, tile=64, min_level_size=256)
        mask = np.zeros((32, 32), np.uint8)
        mask[:16, :24], mask[16:, :24] = 1, 2
        Image.fromarray(mask, mode="L").save(d / "slides" / f"s{k}.mask.png")
    tile_directory(d / "slides", d / "index", TilingParams(level=0, tile_size=32), classes=("pink", "purple"),
                   progress=False)
    return d


def tiles_cfg(d, **seg):
    return from_dict({"sites": [{"name": "a"}], "task": "segment", "run": {"root": str(d / "runs")},
                      "data": {"name": "tiles", "val_fraction": 0.5,
                               "tiles": {"slides_dir": str(d / "slides"), "index_dir": str(d / "index"),
                                         "level": 0, "tile_size": 32, "input_size": 16}},
                      "segment": {"net_args": {"channels": [4, 8], "strides": [2]}, **seg}})


def test_tiles_come_with_their_masks_at_tile_resolution(painted_index, tmp_path):
    import types

    import torch

    from hpcfl.site.data import SiteRank
    from hpcfl.tasks.segment import SegmentTask

    cfg = tiles_cfg(painted_index, tile_normalize=False)  # pixels as read (normalized: z-scores per channel)
    SegmentTask.prepare_data(cfg)  # every slide's mask checked
    site = types.SimpleNamespace(index=0, name="a", size=1)
    data = SegmentTask.site_data(cfg, types.SimpleNamespace(sites=cfg.sites), SiteRank(site, 0, 1), tmp_path, {},
                                 torch.device("cpu"))
    try:
        assert (data.num_classes, data.input_shape) == (3, (3, 16, 16))
        ix = data.index
        (x, y), = list(data.val_batches(len(data.val_ds)))
        tiles = [int(d["i"]) for d in data.val_ds.data]
        assert x.shape == (len(tiles), 3, 16, 16) and y.shape == (len(tiles), 1, 16, 16) and y.dtype == torch.int64
        for k, i in enumerate(tiles):  # a tile's mask: its slide's mask under it (8 px a mask pixel, 2 px a sample)
            rows = (int(ix.y[i]) + np.arange(16) * 2 + 1) // 8
            cols = (int(ix.x[i]) + np.arange(16) * 2 + 1) // 8
            want = np.where(rows[:, None] < 16, 1, 2) * (cols[None, :] < 24)
            assert y[k, 0].numpy().tolist() == want.tolist(), i
            purple = x[k, 0] < 0.6  # red channel: 200/255 pink, 120/255 purple
            assert (purple.numpy() == (want == 2)).mean() > 0.9
        a = [b for b in data.epoch_batches(1, 0, 4)]
        assert len(a) == data.steps_per_epoch(4) and all(torch.equal(p[0], q[0]) for p, q in
                                                          zip(a, data.epoch_batches(1, 0, 4)))
    finally:
        data.close()


def test_a_tile_slide_whose_mask_holds_an_undeclared_class_is_named_before_the_sites_start(painted_index):
    from hpcfl.tasks.segment import SegmentTask

    with pytest.raises(DataError) as exc:
        SegmentTask.prepare_data(tiles_cfg(painted_index, classes=["pink"]))
    assert one_line(exc) == (f"{painted_index / 'slides' / 's0.mask.png'}: label value 2 is outside the declared "
                             "classes 0..1 (background, pink)")


def test_plain_cached_and_smart_pipelines(tmp_path):
    """The plain pipeline (Dataset + DataLoader) feeds exactly the cached one's patches (random transforms are
    seeded per item); SmartCacheDataset serves cache_rate of the shard an epoch."""
    import types

    import torch

    from hpcfl.site.data import SiteRank
    from hpcfl.tasks.segment import SegmentTask

    site = types.SimpleNamespace(index=0, name="a", size=1)
    out = {}
    for kind, loader in (("none", False), ("cache", True), ("smart", True)):
        cfg = seg_cfg(tmp_path, segment={"patch_size": [8, 8, 8], "net_args": {"channels": [4, 8], "strides": [2]},
                                         "cache": kind, "thread_loader": loader, "cache_rate": 0.5},
                      data={"name": "volumes", "volumes": {"root": str(tmp_path / "vol"),
                                                           "synthesize": {"volumes": 5, "size": [16, 16, 16]}}})
        SegmentTask.prepare_data(cfg)
        d = SegmentTask.site_data(cfg, types.SimpleNamespace(sites=[site, None]), SiteRank(site, 0, 1), tmp_path,
                                  {}, torch.device("cpu"))
        try:
            out[kind] = (d.epoch_items, [torch.cat([x for x, _ in d.epoch_batches(1, e, 2)]) for e in (0, 1)])
        finally:
            d.close()
    assert (out["none"][0], out["cache"][0], out["smart"][0]) == (4, 4, 2)  # smart: cache_rate 0.5 of 4 an epoch
    assert all(torch.equal(a, b) for a, b in zip(out["none"][1], out["cache"][1]))
    assert out["smart"][1][0].shape == (2 * 2, 1, 8, 8, 8)
