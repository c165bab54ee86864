"""The tile pipeline's config section (``data.tiles``), kept beside the code that reads it.

It imports only :mod:`hpcfl.fields`, so the schema (hpcfl.config) can include it without importing
the tile pipeline itself: it belongs to the config layer (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

from ..fields import setting as _f


@dataclass(frozen=True)
class SynthConfig:
    slides: int = _f(8, help="number of synthetic slides", min=2)
    size: int = _f(4096, help="side of a synthetic slide in level-0 pixels", min=512)
    seed: int = _f(0, help="seed of the synthetic slides", min=0)
    hospitals: int = _f(0, help="> 0: slides with slide-level labels (tumour focus or none) from this many hospitals, each with its own stain shift and share of tumour slides; written to labels.csv (slide_id,label,site) for data.tiles.labels / data.bags.labels", min=0, max=26)
    prevalence: Tuple[float, ...] = _f((0.35, 0.65), help="hospitals: share of tumour slides per hospital (cycled)")
    stain_shift: float = _f(0.1, help="hospitals: spread of each hospital's stain direction and strength shift", min=0.0, max=1.0)
    pattern: Literal["focus", "atypia"] = _f("focus", help="hospitals: what makes a slide `tumour`: focus (a tumour focus is present; a random encoder's features already tell it) or atypia (every slide has an epithelial focus; only its nuclei's shape and size variation differ, colour and density are matched)")


@dataclass(frozen=True)
class CacheConfig:
    type: Literal["nocache", "per_process", "shared_memory"] = _f("shared_memory", help="cuCIM tile cache, per rank (shared with its loader workers); per_process is not safe with cuCIM 26.10: it can serve another slide's tile at the same position (rapidsai/cucim#1108)")
    capacity_mb: int = _f(256, help="cuCIM tile cache capacity per process, MiB", min=1)


@dataclass(frozen=True)
class SmartCacheConfig:
    cache_num: int = _f(256, help="tiles each rank keeps cached (MONAI SmartCacheDataset)", min=1)
    replace_rate: float = _f(0.25, help="fraction of the cache replaced every epoch", gt=0.0, max=1.0)


@dataclass(frozen=True)
class TilesConfig:
    slides_dir: str = _f("data/slides", help="directory of slides (.svs, .tif, .tiff)")
    index_dir: str = _f("data/index", help="tile index directory (Feather per slide); built by rank 0 if missing")
    synthesize: Optional[SynthConfig] = _f(None, help="write synthetic slides into slides_dir if it has none")
    level: int = _f(1, help="pyramid level tiles are read at", min=0)
    tile_size: int = _f(128, help="tile side in pixels at `level`", min=8)
    stride: int = _f(0, help="grid stride at `level` (0 = tile_size)", min=0)
    input_size: int = _f(64, help="side of the model's input: tiles are resized (or cropped) to it", min=8)
    backend: Literal["cucim", "openslide"] = _f("cucim", help="slide reader")
    partition: Literal["slide", "dirichlet", "quantity", "labels"] = _f("slide", help="how slides are split over sites: round-robin, label skew Dir(data.dirichlet_alpha), quantity skew, or the site column of `labels`")
    labels: str = _f("", help="slide labels CSV (slide_id,label[,site]); needed by partition: labels")
    cache: CacheConfig = _f(CacheConfig(), help="cuCIM tile cache")
    loader_workers: int = _f(0, help="DataLoader worker processes per rank", min=0)
    augment: bool = _f(True, help="random flips and 90-degree rotations, per item seed, applied to whole batches")
    crops_per_read: int = _f(1, help="batch-by-transform: training crops of input_size cut from each tile read (1 = resize the tile)", min=1)
    batched_reads: bool = _f(False, help="read a batch's tiles per slide with cuCIM's multi-location read_region")
    smart_cache: Optional[SmartCacheConfig] = _f(None, help="train from a MONAI SmartCacheDataset (note: resume is not bit-identical with it)")
    decode_device: Literal["cpu", "cuda"] = _f("cpu", help="where cuCIM decodes tiles: cpu, or cuda (nvJPEG; batches assembled on the GPU with CuPy and handed to torch by DLPack)")
    prefetch: Optional[int] = _f(None, help="batches read and assembled ahead in a background thread; unset: 2 when the rank trains on a GPU, 0 (in the training thread) on the CPU, where a thread helps only with a core to spare (bench/tiles.py); loader_workers > 0 prefetch instead", min=0)


__all__ = ["CacheConfig", "SmartCacheConfig", "SynthConfig", "TilesConfig"]
