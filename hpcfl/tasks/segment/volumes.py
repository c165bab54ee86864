"""3D volumes of a site: a MONAI/MMAR decathlon datalist of NIfTI image/label pairs, and synthetic ones.

A site's data is ``<data.volumes.root>/<data.volumes.datalist>`` (``{site}`` is the site's name),
in the Medical Segmentation Decathlon / Clara MMAR format::

    {"labels": {"0": "background", "1": "spleen"},            # optional (else segment.classes)
     "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [{"image": ..., "label": ...}, ...]}       # optional: else data.val_fraction of training

Paths are relative to the datalist's folder (or absolute). Rank 0 checks every entry before any site
rank starts (:func:`check_site`: files exist, image and label shapes agree, in headers only); label
values are checked where the volumes are loaded (:func:`check_labels`). Synthetic volumes follow
MONAI's ``create_test_image_3d`` recipe (spheres of each class in noise) plus a per-site intensity
shift, as between scanners, written as real NIfTI files with nibabel. No torch here: rank 0 runs it.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import ConfigError, DataError, require


@dataclass(frozen=True)
class SiteVolumes:
    """One site's datalist, resolved: absolute paths, the classes it declares, image channels and shape."""

    datalist: Path
    training: List[Dict[str, str]]
    validation: List[Dict[str, str]]
    classes: Tuple[str, ...]  # foreground class names (label 1, 2, ...)
    channels: int


def datalist_path(cfg, site: str) -> Path:
    v = cfg.data.volumes
    return Path(v.root) / v.datalist.replace("{site}", site)


def _nib():
    return require("nibabel", "pip install nibabel (it is in requirements.txt)")


def _shape(path: str, where: str) -> Tuple[int, ...]:
    """A NIfTI file's shape from its header (no voxels read)."""
    try:
        return tuple(int(s) for s in _nib().load(path).shape)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise DataError(f"{path}: cannot read as NIfTI ({where}): {exc}") from None


def _entries(doc: Dict[str, Any], key: str, base: Path, path: Path) -> List[Dict[str, str]]:
    items = doc.get(key, [])
    if not isinstance(items, list):
        raise DataError(f"{path}: {key}: expected a list of {{image, label}}, got {type(items).__name__}")
    out = []
    for i, e in enumerate(items):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("label"), str):
            raise DataError(f"{path}: {key}[{i}]: expected {{\"image\": file, \"label\": file}}, got {e!r}"[:300])
        out.append({k: str(base / e[k]) for k in ("image", "label")})
    return out


def _declared(doc: Dict[str, Any], cfg, path: Path) -> Tuple[str, ...]:
    if cfg.segment.classes:
        return tuple(cfg.segment.classes)
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: no \"labels\" mapping (e.g. {{\"0\": \"background\", \"1\": \"organ\"}}); "
                        "add one or set segment.classes")
    try:
        ids = sorted(int(k) for k in labels)
    except ValueError:
        raise DataError(f"{path}: labels: keys must be label values 0, 1, ..., got {sorted(labels)}") from None
    if ids != list(range(len(ids))):
        raise DataError(f"{path}: labels: values must be 0, 1, ..., {len(ids) - 1} without gaps, got {ids}")
    return tuple(str(labels[str(k)] if str(k) in labels else labels[k]) for k in ids[1:])


def read_site(cfg, site: str, site_index: int) -> SiteVolumes:
    """A site's datalist, parsed and resolved (no image read); a bad file is one DataError naming it."""
    path = datalist_path(cfg, site)
    if not path.is_file():
        hint = "" if cfg.data.volumes.synthesize is not None else " (or set data.volumes.synthesize)"
        raise DataError(f"{path}: datalist of site {site!r} not found (data.volumes.datalist){hint}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON datalist: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: a datalist is a JSON object with \"training\" and \"validation\" lists")
    base = path.parent
    training = _entries(doc, "training", base, path)
    validation = _entries(doc, "validation", base, path)
    if not validation:  # MMAR datalists may leave it out: hold out data.val_fraction, seeded
        from ...data import train_val_split

        if len(training) < 2:
            raise DataError(f"{path}: needs a \"validation\" list or at least 2 training entries")
        tr, va = train_val_split(np.arange(len(training)), cfg.data.val_fraction, cfg.run.seed, site_index, stream=61)
        training, validation = [training[i] for i in tr], [training[i] for i in va]
    if not training:
        raise DataError(f"{path}: the \"training\" list is empty")
    return SiteVolumes(path, training, validation, _declared(doc, cfg, path), 0)


def check_site(vols: SiteVolumes) -> SiteVolumes:
    """Every entry's files exist and image and label agree in shape (headers only); returns it with the
    image channel count (a 4D image is channels last, as NIfTI stores multi-modal volumes)."""
    channels = set()
    for key, items in (("training", vols.training), ("validation", vols.validation)):
        for i, e in enumerate(items):
            where = f"{vols.datalist}: {key}[{i}]"
            for k in ("image", "label"):
                if not Path(e[k]).is_file():
                    raise DataError(f"{e[k]}: not found ({where}.{k})")
            img, lab = _shape(e["image"], f"{where}.image"), _shape(e["label"], f"{where}.label")
            lab3 = lab[:3] if len(lab) == 4 and lab[3] == 1 else lab
            if len(img) not in (3, 4) or len(lab3) != 3 or img[:3] != lab3:
                raise DataError(f"{e['image']}: image shape {img} differs from its label's {lab} ({e['label']}; "
                                f"{where})")
            channels.add(img[3] if len(img) == 4 else 1)
    if len(channels) > 1:
        raise DataError(f"{vols.datalist}: images have different channel counts {sorted(channels)}")
    return SiteVolumes(vols.datalist, vols.training, vols.validation, vols.classes, channels.pop())


def check_labels(label: np.ndarray, num_classes: int, path: str, classes: Sequence[str]) -> None:
    """A label volume (or mask) holds only the declared class values 0 .. num_classes - 1."""
    lab = np.asarray(label)
    if lab.size == 0:
        return
    lo, hi = float(lab.min()), float(lab.max())
    if lo < 0 or hi > num_classes - 1 or (lab.dtype.kind == "f" and not np.all(lab == np.round(lab))):
        bad = hi if hi > num_classes - 1 else lo
        raise DataError(f"{path}: label value {bad:g} is outside the declared classes 0..{num_classes - 1} "
                        f"(background, {', '.join(classes)})")


def sites_volumes(cfg, names: Sequence[str]) -> List[SiteVolumes]:
    """Every site's datalist, checked; all must declare the same classes and image channels."""
    out = [check_site(read_site(cfg, n, i)) for i, n in enumerate(names)]
    first = out[0]
    for v in out[1:]:
        if v.classes != first.classes:
            raise DataError(f"{v.datalist}: declares classes {list(v.classes)}, {first.datalist} declares "
                            f"{list(first.classes)}: every site must use the same labels (or set segment.classes)")
        if v.channels != first.channels:
            raise DataError(f"{v.datalist}: images of {v.channels} channel(s), {first.datalist}'s have "
                            f"{first.channels}")
    return out


# -- synthetic volumes ----------------------------------------------------------------------------------------------

def _synth_record(s, shift: float) -> Dict[str, Any]:
    return {"volumes": s.volumes, "size": list(s.size), "classes": s.classes, "noise": s.noise, "shift": shift,
            "seed": s.seed}


def synthesize_site(cfg, site: str, site_index: int) -> Path:
    """Write a site's synthetic NIfTI volumes and datalist (again where its settings changed); returns the
    datalist. Each volume depends only on (seed, site index, volume index)."""
    s = cfg.data.volumes.synthesize
    if len(s.size) != 3:
        raise ConfigError(f"data.volumes.synthesize.size: expected [x, y, z], got {list(s.size)}")
    shift = float(s.shift[site_index % len(s.shift)]) if s.shift else 0.0
    path = datalist_path(cfg, site)
    record = _synth_record(s, shift)
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("synthesized")
        except (OSError, ValueError, AttributeError):
            old = None
        if old == record:
            return path
        if old is None:
            return path  # a user's datalist: never overwritten
        print(f"hpcfl: {path} was synthesized with other settings; synthesizing site {site!r} again",
              file=sys.stderr, flush=True)
    return _write_site(path, s, site_index, shift, record)


def test_volume(shape: Tuple[int, int, int], objects: int, rad: Tuple[int, int], noise: float, classes: int,
                rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], labels) of spheres of random class in uniform noise: MONAI's create_test_image_3d
    recipe in NumPy (importing MONAI imports torch, which rank 0 must not)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    image = np.zeros(shape, np.float32)
    for _ in range(objects):
        centre = [int(rng.integers(rad[1], n - rad[1])) for n in shape]
        r = int(rng.integers(rad[0], rad[1]))
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
        image[ball] = np.ceil(rng.random() * classes)
    labels = np.ceil(image).astype(np.uint8)
    noisy = np.maximum(image, rng.uniform(0, classes * noise, size=shape).astype(np.float32))
    lo, hi = float(noisy.min()), float(noisy.max())
    return ((noisy - lo) / (hi - lo) if hi > lo else noisy).astype(np.float32), labels


def _write_site(path: Path, s, site_index: int, shift: float, record: Dict[str, Any]) -> Path:
    nib = _nib()
    folder = path.parent
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    shape = tuple(int(v) for v in s.size)
    rad_max = max(3, min(shape) // 5)
    entries = []
    for k in range(s.volumes):
        img, lab = test_volume(shape, 6, (max(2, rad_max // 3), rad_max), s.noise, s.classes,
                               np.random.default_rng([s.seed, 71, site_index, k]))
        name = f"vol{k:03d}.nii.gz"
        _save(nib, (img + shift).astype(np.float32), folder / "imagesTr" / name)
        _save(nib, lab.astype(np.uint8), folder / "labelsTr" / name)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    n_val = max(1, s.volumes // 4)
    doc = {"name": f"hpcfl synthetic volumes, site {site_index}", "synthesized": record,
           "labels": {"0": "background", **{str(c): f"class{c}" for c in range(1, s.classes + 1)}},
           "training": entries[:-n_val], "validation": entries[-n_val:]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _save(nib, arr: np.ndarray, path: Path) -> None:
    """A NIfTI file written under a temporary name (nibabel picks the format by suffix) and renamed."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_volumes(cfg) -> List[SiteVolumes]:
    """Rank 0, before the sites start: synthesize where asked, then check every site's datalist."""
    names = [s.name for s in cfg.sites]
    if cfg.data.volumes.synthesize is not None:
        for i, n in enumerate(names):
            synthesize_site(cfg, n, i)
    return sites_volumes(cfg, names)


def volume_record(cfg, names: Sequence[str]) -> Dict[str, Any]:
    """Per site: its datalist and counts (manifest.json)."""
    sites = {}
    for i, n in enumerate(names):
        v = read_site(cfg, n, i)
        sites[n] = {"datalist": str(v.datalist), "train": len(v.training), "val": len(v.validation)}
    return {"dataset": "volumes", "sites": sites}


def shift_of(cfg, site_index: int) -> Optional[float]:
    s = cfg.data.volumes.synthesize
    return None if s is None or not s.shift else float(s.shift[site_index % len(s.shift)])
