"""``task: segment``'s config section (``segment``, and ``data.volumes`` that only it reads) and the checks
its per-key bounds cannot express.

It imports only :mod:`hpcfl.fields` and the errors, so the schema (hpcfl.config) includes it without
importing the task: it belongs to the config layer (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

import numpy as np

from ...fields import setting as _f
from ...errors import ConfigError


@dataclass(frozen=True)
class VolumeSynthConfig:
    volumes: int = _f(8, help="synthetic volumes per site (MONAI's create_test_image_3d: spheres of each class in noise)", min=2)
    size: Tuple[int, ...] = _f((48, 48, 48), help="[x, y, z] voxels of a synthetic volume")
    classes: int = _f(2, help="foreground classes of the synthetic labels (1..classes; 0 = background)", min=1, max=8)
    noise: float = _f(0.4, help="noise_max of create_test_image_3d (uniform noise up to classes * noise, before rescaling)", min=0.0)
    shift: Tuple[float, ...] = _f((0.0, 0.3, -0.3), help="per-site intensity shift, as between scanners: site i adds shift[i % len]", )
    seed: int = _f(0, help="seed of the synthetic volumes", min=0)


@dataclass(frozen=True)
class VolumesConfig:
    root: str = _f("data/volumes", help="folder of the sites' data: <root>/<datalist> per site")
    datalist: str = _f("{site}/datalist.json", help="each site's MONAI/MMAR decathlon datalist (training/validation lists of {image, label}; paths relative to its folder), relative to root; {site} = the site's name")
    synthesize: Optional[VolumeSynthConfig] = _f(None, help="write synthetic NIfTI volumes and datalists under root where a site has none")


@dataclass(frozen=True)
class SegmentConfig:
    net: str = _f("UNet", help="a network of monai.networks.nets, by name (UNet, BasicUNet, SegResNet, UNETR, ...)")
    net_args: Dict[str, Any] = _f({"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}, help="its keyword arguments; spatial_dims, in_channels and out_channels come from the data unless given")
    loss: Literal["dice_ce", "dice"] = _f("dice_ce", help="MONAI DiceCELoss or DiceLoss (softmax, one-hot labels)")
    include_background: bool = _f(False, help="count class 0 in the Dice loss and in mean Dice")
    patch_size: Tuple[int, ...] = _f((32, 32, 32), help="volumes: training patch [x, y, z] (RandCropByPosNegLabeld) and sliding-window size; tiles train on whole tiles of data.tiles.input_size")
    samples_per_volume: int = _f(2, help="volumes: patches cut from each volume per step (num_samples of RandCropByPosNegLabeld)", min=1)
    pos_fraction: float = _f(0.5, help="volumes: fraction of patches centred on foreground", min=0.0, max=1.0)
    intensity_range: Optional[Tuple[float, ...]] = _f(None, help="volumes: [a_min, a_max] window scaled to [0, 1] and clipped (ScaleIntensityRanged, as for CT); null = z-score per volume (NormalizeIntensityd)")
    sw_batch_size: int = _f(4, help="windows per forward in sliding-window validation", min=1)
    sw_overlap: float = _f(0.25, help="overlap of sliding windows", min=0.0, max=0.9)
    hausdorff: bool = _f(False, help="also report the 95th-percentile Hausdorff distance (per validation item and class, averaged; pixels)")
    cache: Literal["none", "cache", "smart"] = _f("cache", help="MONAI CacheDataset (deterministic transforms once, random ones every epoch), SmartCacheDataset (replace_rate of the cache renewed each epoch), or a plain Dataset")
    cache_rate: float = _f(1.0, help="cache: fraction of a rank's items cached (smart: the cache's size)", gt=0.0, max=1.0)
    replace_rate: float = _f(0.25, help="smart: fraction of the cache replaced every epoch", gt=0.0, max=1.0)
    thread_loader: bool = _f(True, help="MONAI ThreadDataLoader (random transforms in a background thread) instead of torch's DataLoader")
    cache_on_device: bool = _f(False, help="on a GPU: cached items are moved to the device once (ToDeviced), random transforms run there")
    classes: Tuple[str, ...] = _f((), help="names of the foreground classes (label 1, 2, ...); empty = from the data (the datalist's labels, the tile index's classes)")
    tile_normalize: bool = _f(True, help="tiles: z-score each tile per colour channel (NormalizeIntensityd): stain strength and hue differ between slides, texture tells the tissues apart")


def check(cfg) -> None:
    """What per-key bounds cannot catch, refused at load with the key named (no torch here)."""
    seg, d = cfg.segment, cfg.data
    if d.name not in ("tiles", "volumes"):
        raise ConfigError(f"data.name: task segment reads tiles (with masks) or volumes, not {d.name!r}")
    if d.name == "tiles":
        t = d.tiles
        for key, value, ok in (("decode_device", t.decode_device, "cpu"), ("crops_per_read", t.crops_per_read, 1),
                               ("loader_workers", t.loader_workers, 0), ("smart_cache", t.smart_cache, None)):
            if value != ok:
                raise ConfigError(f"data.tiles.{key}: {value!r} is not used by task segment, whose tiles go through "
                                  f"MONAI's pipeline (segment.cache, segment.thread_loader); leave it at {ok!r}")
    if d.name == "volumes":
        if len(seg.patch_size) != 3 or min(seg.patch_size) < 4:
            raise ConfigError(f"segment.patch_size: expected [x, y, z] of at least 4 voxels, got {list(seg.patch_size)}")
        syn = d.volumes.synthesize
        if syn is not None:
            if len(syn.size) != 3 or min(syn.size) < 16:
                raise ConfigError(f"data.volumes.synthesize.size: expected [x, y, z] of at least 16 voxels, got "
                                  f"{list(syn.size)}")
            if len(syn.shift) == 0:
                raise ConfigError("data.volumes.synthesize.shift: give at least one shift (0 = none)")
    if seg.intensity_range is not None and (len(seg.intensity_range) != 2
                                            or not seg.intensity_range[0] < seg.intensity_range[1]):
        raise ConfigError(f"segment.intensity_range: expected [a_min, a_max] with a_min < a_max, got "
                          f"{list(seg.intensity_range)}")
    strides = seg.net_args.get("strides")
    if d.name == "volumes" and isinstance(strides, (list, tuple)) and strides:
        step = int(np.prod([s if isinstance(s, int) else max(s) for s in strides]))
        bad = [p for p in seg.patch_size if p % step]
        if bad:
            raise ConfigError(f"segment.patch_size: {list(seg.patch_size)} must be multiples of {step} (the product "
                              f"of segment.net_args.strides) so the network's skip connections line up")
    for key in ("spatial_dims", "in_channels", "out_channels"):
        v = seg.net_args.get(key)
        if v is not None and not isinstance(v, int):
            raise ConfigError(f"segment.net_args.{key}: expected an integer, got {v!r}")


__all__ = ["SegmentConfig", "VolumeSynthConfig", "VolumesConfig", "check"]
