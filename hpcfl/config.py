"""Typed, validated configuration.

YAML goes through one loader (``1e-3`` is a float, duplicate keys are errors),
is merged with ``--set key.path=value`` overrides in one place
(:func:`load_config`), and becomes a tree of frozen dataclasses. Unknown keys
are rejected with a "did you mean"; every error names the file and key path.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple

import yaml

from .aggregation.strategies import STRATEGIES  # pure NumPy; it does not import the config
from .errors import ConfigError

# --------------------------------------------------------------------------
# YAML: PyYAML implements YAML 1.1, where "1e-3" is a string. Users mean a
# number, so our loader resolves it as a float; it also rejects duplicate keys,
# which PyYAML silently lets the last one win.


class _Loader(yaml.SafeLoader):
    """SafeLoader with our own resolvers and constructors (the global one is left alone)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# Limits that keep a small hostile or mistaken file from becoming a huge or endless
# load: aliases may repeat a subtree (YAML's "billion laughs"), so the size is
# counted with every alias expanded, as every later walk of the config sees it.
MAX_CONFIG_BYTES = 256 << 10  # a config file is read only up to this size (checked before parsing; ~3 s to parse)
MAX_YAML_DEPTH = 64  # nested lists/mappings, aliases expanded
MAX_YAML_NODES = 100_000  # values in the document, aliases expanded


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are plain scalars, without duplicates; merge keys (``<<: *base``) are
    merged first, and the mapping's own keys override the merged ones, as YAML specifies."""
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _compose_node(self: Any, parent: Any, index: Any) -> Any:
    """PyYAML's composer recurses once per nesting level: stop at MAX_YAML_DEPTH, before Python's stack does."""
    depth = getattr(self, "_hpcfl_depth", 0)
    if depth >= MAX_YAML_DEPTH and not self.check_event(yaml.AliasEvent, yaml.ScalarEvent):
        raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                          self.peek_event().start_mark)
    self._hpcfl_depth = depth + 1
    try:
        return yaml.composer.Composer.compose_node(self, parent, index)
    finally:
        self._hpcfl_depth = depth


def _compose_document(self: Any) -> Any:
    node = yaml.composer.Composer.compose_document(self)
    _check_expansion(node)
    return node


_Loader.compose_node = _compose_node  # type: ignore[method-assign]
_Loader.compose_document = _compose_document  # type: ignore[method-assign]


def _check_expansion(root: Any) -> None:
    """Size and depth of the document with every alias expanded, counted once per distinct node."""
    size: Dict[int, int] = {}
    depth: Dict[int, int] = {}
    stack = [(root, False)]
    on_path = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"holds more than {MAX_YAML_NODES} values (aliases expanded); a config is limited to that", node.start_mark)
            if depth[key] > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", node.start_mark)
            continue
        if key in size:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it",
                                              node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _children(node: Any) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """One YAML document with our resolvers; every error is a ConfigError naming the source and line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where}: invalid YAML: {problem}") from None
    except RecursionError:  # a structure built past the limits (it should not get here)
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def read_config_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """A config file's text: read as bytes (at most ``limit``, checked before parsing), decoded as UTF-8."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise ConfigError(f"{path}: {os.fstat(f.fileno()).st_size} bytes; a config file may have at most "
                                  f"{limit} bytes (is it the right file?)")
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: more than {limit} bytes; a config file may have at most {limit} bytes")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes), not a YAML config")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                          "a config must be a UTF-8 YAML file") from None


# --------------------------------------------------------------------------
# The schema. Field metadata: "min"/"max" are inclusive bounds, "gt" exclusive,
# "help" is the one-line description printed in the README's config reference.


def _f(default: Any = dataclasses.MISSING, *, help: str, **checks: Any) -> Any:
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("", help="run directory name under `root`; default: the config file's stem")
    root: str = _f("runs", help="parent of run directories (relative to the working directory)")
    seed: int = _f(0, help="seed for model init, data partition and shuffling", min=0)


@dataclass(frozen=True)
class SiteOverrides:
    local_epochs: Optional[int] = _f(None, help="this site's local epochs per round", min=1)
    local_steps: Optional[int] = _f(None, help="this site's local optimizer steps per round", min=1)
    lr: Optional[float] = _f(None, help="this site's learning rate", gt=0.0)
    batch_size: Optional[int] = _f(None, help="this site's per-rank batch size", min=1)


@dataclass(frozen=True)
class SiteConfig:
    name: str = _f(help="site (institution) name; letters, digits, '-', '_', '.'")
    ranks: int = _f(1, help="MPI ranks (data-parallel replicas) of this site", min=1)
    overrides: SiteOverrides = _f(SiteOverrides(), help="per-site training overrides")
    dropout: float = _f(0.0, help="simulated: probability that this site does not return its update in a round (seeded)", min=0.0, max=1.0)
    speed: float = _f(1.0, help="simulated: relative speed; a round takes steps * fl.stragglers.step_time_s / speed simulated seconds", gt=0.0)




@dataclass(frozen=True)
class ServerOptConfig:
    lr: Optional[float] = _f(None, help="server learning rate (default 1.0 for fedavgm, 0.01 for fedadam/fedyogi/fedadagrad)", gt=0.0)
    momentum: float = _f(0.9, help="fedavgm: server momentum", min=0.0, max=0.999)
    beta1: Optional[float] = _f(None, help="first-moment decay (default 0.9 for fedadam/fedyogi, 0.0 for fedadagrad)", min=0.0, max=0.999)
    beta2: float = _f(0.99, help="fedadam/fedyogi: second-moment decay", min=0.0, max=0.999)
    tau: float = _f(1e-3, help="fedadam/fedyogi/fedadagrad: adaptivity (epsilon); second moments start at tau^2", gt=0.0)


@dataclass(frozen=True)
class RobustConfig:
    trim_fraction: float = _f(0.1, help="trimmed_mean: fraction of sites trimmed at each end, per coordinate", min=0.0, max=0.49)
    byzantine: int = _f(0, help="krum: number of Byzantine sites f tolerated (needs sites >= 2f + 3)", min=0)
    krum_keep: int = _f(1, help="krum: sites kept and averaged (1 = Krum, more = Multi-Krum)", min=1)


@dataclass(frozen=True)
class SamplingConfig:
    fraction: float = _f(1.0, help="fraction of sites sampled each round (seeded, reproducible)", gt=0.0, max=1.0)
    min_sites: int = _f(1, help="sample at least this many sites", min=1)


@dataclass(frozen=True)
class StragglerConfig:
    step_time_s: float = _f(1.0, help="simulated seconds one local step takes at speed 1", gt=0.0)
    deadline_s: Optional[float] = _f(None, help="simulated round deadline: sites slower than this do not return (null = wait for all)", gt=0.0)


@dataclass(frozen=True)
class FLConfig:
    rounds: int = _f(10, help="federated rounds", min=1)
    local_epochs: Optional[int] = _f(None, help="local epochs per round (default 1 when local_steps is unset)", min=1)
    local_steps: Optional[int] = _f(None, help="local optimizer steps per round instead of epochs", min=1)
    strategy: Literal[STRATEGIES] = _f("fedavg", help="aggregation rule (docs/algorithms.md)")  # type: ignore[valid-type]
    proximal_mu: float = _f(0.01, help="fedprox: weight mu of the proximal term mu/2 |w - w_global|^2 in local training", gt=0.0)
    server: ServerOptConfig = _f(ServerOptConfig(), help="server optimizer (fedavgm, fedadam, fedyogi, fedadagrad)")
    robust: RobustConfig = _f(RobustConfig(), help="robust rules (trimmed_mean, krum)")
    sampling: SamplingConfig = _f(SamplingConfig(), help="which sites take part in a round")
    stragglers: StragglerConfig = _f(StragglerConfig(), help="simulated time and the round deadline")
    min_sites: int = _f(1, help="a round aggregates only if at least this many sites return", min=1)
    on_too_few: Literal["retry", "skip", "fail"] = _f("retry", help="when fewer than min_sites return: redraw who takes part (up to max_retries), keep the global model unchanged, or stop with an error")
    max_retries: int = _f(10, help="retry: redraws before the round fails", min=1)


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
class FeatureBagsConfig:
    dir: str = _f("data/features", help="tile features, one file per slide (written by `hpcfl features`)")
    labels: str = _f("", help="slide labels CSV: slide_id,label[,site] (required)")
    partition: Literal["slide", "labels"] = _f("labels", help="which site owns a slide: the CSV's site column (labels), or a seeded round-robin (slide)")
    max_tiles: int = _f(512, help="training: at most this many tiles of a slide per step (a seeded sample; evaluation sees all)", min=1)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic", "tiles", "volumes", "arrays", "features"] = _f("digits", help="dataset: scikit-learn's bundled digits, synthetic Gaussian classes, WSI tiles, NIfTI volumes (task: segment), arrays of your own (data.path), or per-slide tile features (bags, for task: mil)")
    path: str = _f("", help="arrays: directory with x.npy (float32, (N, ...)) and y.npy (labels 0..C-1), memory-mapped and shared by the processes of a node")
    val_fraction: float = _f(0.2, help="fraction of each site's data held out for validation", gt=0.0, max=0.9)
    partition: Literal["iid", "dirichlet", "quantity"] = _f("iid", help="how samples are split over sites: iid, label skew Dir(dirichlet_alpha) per class, or quantity skew (site sizes Dir(dirichlet_alpha), labels IID); computed per site on demand, so 10,000 sites cost no per-site objects")
    dirichlet_alpha: float = _f(0.5, help="concentration for partition: dirichlet or quantity (smaller = more skew)", gt=0.0)
    samples: int = _f(4096, help="synthetic: number of samples", min=16)
    features: int = _f(64, help="synthetic: features per sample", min=1)
    classes: int = _f(10, help="synthetic: number of classes", min=2)
    tiles: TilesConfig = _f(TilesConfig(), help="whole-slide-image tiles")
    volumes: VolumesConfig = _f(VolumesConfig(), help="3D volumes, one decathlon datalist per site (task: segment)")
    bags: FeatureBagsConfig = _f(FeatureBagsConfig(), help="task mil: per-slide tile features (one bag per slide) and slide labels")
    array_backend: Literal["auto", "numpy", "cupy"] = _f("auto", help="array math: CuPy where a GPU exists (auto), else NumPy; for tile batches auto follows data.tiles.decode_device")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("mlp", help="`mlp`, `cnn`, or `package.module:factory` (called with num_features, num_classes, **args)")
    hidden: Tuple[int, ...] = _f((64,), help="mlp: hidden layer widths")
    batchnorm: bool = _f(False, help="mlp: BatchNorm after each hidden layer")
    conv_blocks: int = _f(3, help="cnn: strided conv + GroupNorm + ReLU blocks (16, 32, 64, ... channels)", min=1, max=8)
    stain_jitter: float = _f(0.0, help="cnn: in training only, scale each image's optical density per colour channel by exp(sigma * N(0,1)) (x -> x**k for inputs in [0, 1]): robustness to stain and scanner colour shifts between slides (hpcfl.stain); 0 = off", min=0.0, max=2.0)
    args: Dict[str, Any] = _f({}, help="extra keyword arguments for a factory model")


@dataclass(frozen=True)
class TrainConfig:
    device: Literal["auto", "cpu", "cuda"] = _f("auto", help="where site ranks train: auto = the rank's GPU when CUDA is available, else the CPU")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", help="mixed precision of local training (autocast; fp16 with a loss scale, fresh each round); the federation always exchanges fp32 weights")
    channels_last: bool = _f(False, help="feed image batches in channels-last memory format (faster convolutions on tensor-core GPUs)")
    cudnn_benchmark: bool = _f(True, help="let cuDNN pick the fastest convolution algorithms (GPU only)")
    optimizer: Literal["sgd", "adam", "adamw"] = _f("sgd", help="local optimizer (state is reset every round)")
    lr: float = _f(0.05, help="learning rate", gt=0.0)
    momentum: float = _f(0.0, help="sgd momentum", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, help="weight decay", min=0.0)
    batch_size: int = _f(32, help="per-rank batch size", min=1)
    eval_batch_size: int = _f(1024, help="per-rank evaluation batch size", min=1)
    threads: int = _f(0, help="torch threads per rank; 0 = cores / ranks on this node", min=0)
    grad_clip: float = _f(0.0, help="clip the (site-averaged) gradient to this global L2 norm before each step; 0 = off", min=0.0)


@dataclass(frozen=True)
class SiteBackendConfig:
    backend: Literal["horovod", "torch"] = _f("horovod", help="data parallelism inside a site: Horovod process sets, or torch.distributed groups (NCCL where each rank of a site has its own GPU, else Gloo: docs/gpu.md)")


@dataclass(frozen=True)
class DinoCropsConfig:
    global_size: int = _f(48, help="side of the 2 global crops, pixels", min=8)
    local_size: int = _f(24, help="side of the local crops, pixels", min=4)
    local_crops: int = _f(4, help="local crops per tile (0 = global crops only)", min=0)
    global_scale: Tuple[float, ...] = _f((0.4, 0.8), help="[min, max] area fraction of the tile a global crop covers")
    local_scale: Tuple[float, ...] = _f((0.1, 0.2), help="[min, max] area fraction of the tile a local crop covers")
    flip: bool = _f(True, help="random horizontal and vertical flips")
    rotate: bool = _f(True, help="random 90-degree rotations (tissue has no orientation)")
    jitter: float = _f(0.4, help="colour jitter strength: brightness, contrast and saturation factors in [1-j, 1+j]", min=0.0, max=1.0)
    hue: float = _f(0.05, help="colour jitter: hue rotation of up to +-hue turns", min=0.0, max=0.5)
    jitter_prob: float = _f(0.8, help="probability that a crop is colour-jittered", min=0.0, max=1.0)
    grayscale_prob: float = _f(0.2, help="probability that a crop is turned grey", min=0.0, max=1.0)
    blur_prob: Tuple[float, ...] = _f((0.5, 0.1, 0.2), help="Gaussian blur probability of [first global, second global, local] crops")
    blur_sigma: Tuple[float, ...] = _f((0.1, 1.0), help="[min, max] Gaussian blur sigma, pixels of the crop")
    solarize_prob: float = _f(0.2, help="probability that the second global crop is solarized", min=0.0, max=1.0)


@dataclass(frozen=True)
class DinoEvalConfig:
    size: int = _f(0, help="side tiles are resized to for the evaluation; 0 = as the data gives them (data.tiles.input_size)", min=0)
    knn_k: int = _f(20, help="k of the k-NN classifier on frozen teacher features (cosine similarity)", min=1)
    knn_temperature: float = _f(0.07, help="k-NN votes weighted by exp(similarity / T)", gt=0.0)
    probe_iters: int = _f(100, help="L-BFGS iterations of the linear probe (full batch, float64 on CPU: deterministic)", min=1)
    probe_l2: float = _f(1e-3, help="L2 penalty of the linear probe on standardized features", min=0.0)


@dataclass(frozen=True)
class DinoConfig:
    backbone: Literal["cnn", "vit"] = _f("cnn", help="encoder: ResNet-style CNN (GroupNorm) or a small ViT")
    width: int = _f(32, help="cnn: channels of the first of 3 stages (doubled per stage); vit: embedding dimension", min=4)
    depth: int = _f(1, help="cnn: residual blocks per stage; vit: transformer blocks", min=1)
    patch_size: int = _f(4, help="vit: patch side, pixels", min=1)
    heads: int = _f(4, help="vit: attention heads (must divide width)", min=1)
    out_dim: int = _f(1024, help="projection head output dimension (DINO's K prototypes)", min=2)
    head_hidden: int = _f(256, help="projection head MLP width", min=1)
    head_bottleneck: int = _f(64, help="projection head bottleneck before the weight-normalised last layer", min=1)
    norm_last_layer: bool = _f(True, help="fix the last layer's weight-norm gain at 1 (more stable)")
    head_bn: bool = _f(True, help="BatchNorm in the projection head's MLP (DINO's use_bn_in_head; per rank batch statistics)")
    student_temp: float = _f(0.1, help="student softmax temperature", gt=0.0)
    teacher_temp: float = _f(0.04, help="teacher softmax temperature after the warm-up", gt=0.0)
    warmup_teacher_temp: float = _f(0.04, help="teacher temperature at epoch 0", gt=0.0)
    warmup_teacher_temp_epochs: float = _f(0.0, help="local epochs (counted across rounds) of the linear teacher temperature warm-up", min=0.0)
    center_momentum: float = _f(0.9, help="momentum of the centre subtracted from teacher outputs", min=0.0, max=1.0)
    teacher_momentum: float = _f(0.99, help="EMA momentum of the teacher at step 0, raised to 1 along a cosine over all steps (DINO: 0.996 for runs of 100k+ steps)", min=0.0, max=1.0)
    exchange: Literal["student", "student_teacher"] = _f("student_teacher", help="what travels between sites: the student only (each site keeps its teacher) or both")
    center: Literal["averaged", "kept"] = _f("averaged", help="the centre travels and is averaged, or each site keeps its own")
    crops: DinoCropsConfig = _f(DinoCropsConfig(), help="multi-crop augmentation")
    eval: DinoEvalConfig = _f(DinoEvalConfig(), help="label-free pretraining evaluation: k-NN and linear probe")


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


@dataclass(frozen=True)
class MilConfig:
    hidden: int = _f(128, help="width of the tile embedding before attention", min=1)
    attention: int = _f(64, help="width of the gated attention's hidden layer", min=1)
    dropout: float = _f(0.25, help="dropout on tile embeddings in training", min=0.0, max=0.9)
    attention_maps: bool = _f(True, help="at the end, each site writes the final global model's attention per tile of its validation slides to <run>/attention/ (heatmaps in the report)")
    instance_loss: Literal["none", "svm", "ce"] = _f("none", help="CLAM-SB's instance clustering loss: each training bag's instance_k most attended tiles are positives, its instance_k least attended negatives of its class's instance classifier, scored by smooth top-1 SVM (svm, as CLAM) or cross-entropy (ce); none = attention MIL alone")
    instance_k: int = _f(8, help="instance_loss: tiles pseudo-labelled at each end of a bag's attention (capped at half its tiles)", min=1)
    bag_weight: float = _f(0.7, help="instance_loss: loss = bag_weight * slide loss + (1 - bag_weight) * instance loss", min=0.0, max=1.0)


@dataclass(frozen=True)
class PipelineConfig:
    stages: Tuple[str, ...] = _f(("pretrain", "features", "mil"), help="stages `hpcfl launch` runs, in this order: pretrain (the `pretrain` config's federation), features (`hpcfl features` of its run into data.bags.dir), mil (this config)")
    pretrain: str = _f("", help="config of the encoder's federation (e.g. configs/pathology-dino.yaml; relative to the working directory, as data paths are)")
    pretrain_set: Tuple[str, ...] = _f((), help="--set overrides of the pretrain stage")
    checkpoint: Literal["best", "last"] = _f("best", help="features: the pretrain run's best.npz or its last checkpoint")
    batch_size: int = _f(256, help="features: tiles per forward pass", min=1)
    ranks: int = _f(0, help="features: processes (0 = the pretrain config's site ranks)", min=0)


@dataclass(frozen=True)
class PercentileConfig:
    percent: float = _f(10.0, help="share only the largest percent% of |delta w| (the rest as zero)", gt=0.0, max=100.0)
    gamma: float = _f(0.01, help="shared values are clipped to [-gamma, gamma]", gt=0.0)


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float = _f(1.0, help="z: Gaussian noise of std z * clip_norm is added to the sum of clipped updates", min=0.0)
    clip_norm: float = _f(1.0, help="C: each site's update is clipped to L2 norm C (the initial C when adaptive)", gt=0.0)
    delta: float = _f(1e-5, help="delta of the (epsilon, delta) guarantee reported every round", gt=0.0, max=1.0)
    adaptive: bool = _f(False, help="adaptive clipping (Andrew et al. 2021): C tracks a quantile of the update norms")
    target_quantile: float = _f(0.5, help="adaptive: fraction of updates that should be unclipped", gt=0.0, max=1.0)
    clip_lr: float = _f(0.2, help="adaptive: geometric learning rate of C", gt=0.0)
    count_noise_multiplier: float = _f(10.0, help="adaptive: noise multiplier of the unclipped-count (spends part of the budget)", gt=0.0)


@dataclass(frozen=True)
class SecAggConfig:
    frac_bits: int = _f(24, help="fixed-point fractional bits of the masked integers (mod 2^64)", min=8, max=40)


@dataclass(frozen=True)
class PrivacyConfig:
    exclude_vars: Tuple[str, ...] = _f((), help="regexes of parameter names never sent: each site keeps its own values (partial weight sharing)")
    percentile: Optional[PercentileConfig] = _f(None, help="percentile privacy (Shokri & Shmatikov 2015): share the largest updates, clipped")
    dp: Optional[DPConfig] = _f(None, help="differential privacy, DP-FedAvg: clip each site's update, add Gaussian noise to the sum, account (epsilon, delta)")
    secure_aggregation: Optional[SecAggConfig] = _f(None, help="pairwise-masked uploads: rank 0 learns only the sum")


@dataclass(frozen=True)
class EvalConfig:
    locally_tuned: bool = _f(True, help="every round, each site also evaluates its locally trained model on its own validation data")
    cross_site: bool = _f(True, help="at the end, every site's final local model and the global model on every site's validation data (cross_site.json)")
    best_metric: str = _f("auto", help="the global model with the best value of this metric is kept as best.npz: val_<a metric of the task> (classify: val_accuracy, val_loss, val_auc, val_balanced_accuracy); auto = the task's first headline metric")
    auc_bins: int = _f(256, help="score histogram bins per class for AUC (summed over ranks and sites exactly; AUC error < 1/bins)", min=16, max=100000)
    sites_every: int = _f(1, help="evaluate the global model on the sites' validation data every N rounds (and in the last round); the round's val_* metrics are null in the rounds between", min=1)
    sites_max: int = _f(128, help="sites the global model is evaluated on per evaluation: every site up to this many, above it a seeded sample of this many, drawn afresh each round (the round's val_* are then over the sample)", min=1)
    cross_site_max: int = _f(16, help="cross-site validation covers every site up to this many sites; above it, a seeded sample of this many (their final local models and the global model on their validation data), and the printed table is summarised per model", min=1)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _f(1, help="write a checkpoint every N rounds (the last round always)", min=1)
    keep: int = _f(2, help="checkpoints kept on disk", min=1)


@dataclass(frozen=True)
class LaunchConfig:
    mpirun: str = _f("mpirun", help="mpirun executable used by `hpcfl launch`")
    mpirun_args: Tuple[str, ...] = _f((), help="extra mpirun arguments (argv list)")
    chunk_mb: int = _f(8, help="largest MPI message in MiB: models move in chunks of this size, which bounds the reduction buffers MPI allocates at rank 0", min=1, max=1024)
    slots: int = _f(0, help="process groups that simulate the sites (each trains its sites in turn); 0 = one per site where this machine (or cluster) has a core or GPU per rank, else as many as fit", min=0)
    assign: Literal["static", "balanced"] = _f("static", help="which slot trains a site: static (each slot a fixed run of sites), or balanced (each round, rank 0 deals the sampled sites to the slots by estimated work, samples x local steps, longest first: with cohort sampling a slot no longer waits on its own unlucky draw); balanced needs sites of one rank count, a mean-based strategy and no private entries")


@dataclass(frozen=True)
class ClusterConfig:
    nodes: int = _f(1, help="nodes of the SLURM job", min=1)
    sockets_per_node: Optional[int] = _f(None, help="CPU sockets per node; when the config sets none of the three node-shape keys, render/submit read them from SLURM (`scontrol show node`); a key left out is otherwise 2", min=1)
    cores_per_socket: Optional[int] = _f(None, help="cores per socket; left out: from SLURM as for sockets_per_node, else 16", min=1)
    gpus_per_node: Optional[int] = _f(None, help="GPUs per node (0 = CPU nodes: one rank per socket, or per cores_per_rank); left out: from SLURM as for sockets_per_node, else 0", min=0)
    cores_per_rank: int = _f(0, help="cores per site rank (0 = a socket on CPU nodes, a GPU's share on GPU nodes)", min=0)
    ranks_per_gpu: int = _f(1, help="site ranks that share one GPU (e.g. 4 to run a 2-site x 2-rank federation on one GPU); sites whose ranks share a GPU use Gloo, not NCCL (site.backend: torch; Horovod refuses them)", min=1)
    aggregator_cores: int = _f(1, help="cores reserved for rank 0 on the first node (0 = not pinned: it mostly sleeps)", min=0)
    aggregator_own_node: bool = _f(False, help="give rank 0 a node of its own (the sites start on the second)")
    oversubscribe: bool = _f(False, help="more ranks than slots: ranks share slots round-robin (#SBATCH --overcommit); for small test clusters")
    partition: str = _f("", help="SLURM partition (#SBATCH --partition)")
    account: str = _f("", help="SLURM account (#SBATCH --account)")
    qos: str = _f("", help="SLURM QOS (#SBATCH --qos)")
    time_limit: str = _f("01:00:00", help="wall-clock limit (#SBATCH --time)")
    mem_per_node: str = _f("", help="memory per node, e.g. 120G (#SBATCH --mem); empty = the partition's default")
    launcher: Literal["srun", "mpirun", "horovodrun"] = _f("srun", help="how the job starts its ranks")
    srun_mpi: str = _f("pmix", help="srun --mpi plugin (`srun --mpi=list` shows what the cluster offers: pmix, pmi2)")
    modules: Tuple[str, ...] = _f((), help="`module load` lines run before the launch, e.g. [openmpi/4.1, cuda/12.2]")
    setup: Tuple[str, ...] = _f((), help="shell lines run before the launch, e.g. [source /path/to/venv/bin/activate]")
    python: str = _f("python", help="the interpreter that has hpcfl installed, on the compute nodes")
    container: str = _f("", help="Singularity/Apptainer image: every rank runs inside it")
    binds: Tuple[str, ...] = _f((), help="extra container bind mounts (host[:container])")
    requeue: bool = _f(True, help="#SBATCH --requeue: a preempted job restarts and resumes after its last complete round")
    signal_s: int = _f(300, help="seconds before the time limit SLURM warns the job (#SBATCH --signal=B:USR1@N): the federation checkpoints after the round in progress and requeues; 0 = no warning", min=0)


@dataclass(frozen=True)
class FailureInjection:
    rank: int = _f(help="world rank that fails", min=0)
    round: int = _f(help="round in which it fails (at its start)", min=1)
    mode: Literal["raise", "kill", "stop", "oom"] = _f("raise", help="raise an exception, SIGKILL the process, SIGSTOP it (a hung rank), or allocate memory_mb (a leak: killed where a memory limit is lower)")
    memory_mb: int = _f(4096, help="mode oom: MiB the rank allocates, 64 at a time, to exceed its memory limit (it fails with an error if that is not enough)", min=1)


@dataclass(frozen=True)
class RoundHold:
    round: int = _f(help="the round at whose start rank 0 waits (its previous round is checkpointed by then)", min=1)
    file: str = _f(help="rank 0 waits while this file exists; delete it to let the run go on")


@dataclass(frozen=True)
class DebugConfig:
    inject_failure: Optional[FailureInjection] = _f(None, help="make one rank fail on purpose (tests the job's failure handling)")
    hold: Optional[RoundHold] = _f(None, help="hold the run at the start of a round while a file exists: observe a live run at a known round (tests of stop, status, requeue) however fast the machine")
    save_local_weights: bool = _f(False, help="every site rank saves its locally trained weights each round to debug/ (for checking replicas and aggregation)")


@dataclass(frozen=True)
class FaultConfig:
    hang_timeout_s: Optional[float] = _f(None, help="a rank that makes no progress this long ends the job, naming it (null = automatic: hang_floor_s through start-up and the first round, then five times the slowest later round, at least hang_min_s)", gt=0.0)
    hang_floor_s: float = _f(300.0, help="the smallest automatic hang timeout, in seconds, through start-up, the first round and the final cross-site evaluation", gt=0.0)
    hang_min_s: float = _f(60.0, help="once a round after the first has been measured, the automatic hang timeout is five times the slowest such round, at least this many seconds", gt=0.0)
    nonfinite_update: Literal["fail", "skip_site"] = _f("fail", help="a site whose update holds NaN or inf: end the job naming it, or leave it out of that round's aggregate (recorded)")


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = _f("", help="MLflow tracking URI; empty = a local file store in <run.root>/mlruns")
    experiment: str = _f("hpcfl", help="MLflow experiment the run is logged under")


@dataclass(frozen=True)
class ObserveConfig:
    tensorboard: bool = _f(True, help="rank 0 writes TensorBoard event files to runs/<name>/tb/ (every numeric metric, per site)")
    mlflow: Optional[MlflowConfig] = _f(None, help="also log every metric to MLflow (needs mlflow-skinny); null = off")


@dataclass(frozen=True)
class Config:
    sites: Tuple[SiteConfig, ...] = _f(help="the simulated institutions, in rank order (list, or {count, ranks})")
    task: str = _f("classify", help="what is trained: classify (supervised), dino (self-supervised DINO pretraining), segment (MONAI segmentation, Dice), mil (attention MIL on slide labels over tile features), or package.module:Class (a hpcfl.tasks.Task)")
    task_args: Dict[str, Any] = _f({}, help="keyword settings for a user task (package.module:Class), read by the task as cfg.task_args")
    run: RunConfig = _f(RunConfig(), help="run identity")
    fl: FLConfig = _f(FLConfig(), help="federation")
    data: DataConfig = _f(DataConfig(), help="data")
    model: ModelConfig = _f(ModelConfig(), help="model")
    train: TrainConfig = _f(TrainConfig(), help="local training")
    site: SiteBackendConfig = _f(SiteBackendConfig(), help="how the ranks of a site train together")
    privacy: PrivacyConfig = _f(PrivacyConfig(), help="privacy filters around any strategy")
    eval: EvalConfig = _f(EvalConfig(), help="evaluation")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), help="checkpoints")
    launch: LaunchConfig = _f(LaunchConfig(), help="launcher")
    cluster: ClusterConfig = _f(ClusterConfig(), help="the SLURM cluster the job runs on")
    fault: FaultConfig = _f(FaultConfig(), help="hung ranks and diverging sites")
    debug: DebugConfig = _f(DebugConfig(), help="fault injection")
    dino: DinoConfig = _f(DinoConfig(), help="task dino: self-supervised DINO pretraining (hpcfl/tasks/dino)")
    segment: SegmentConfig = _f(SegmentConfig(), help="task segment: MONAI segmentation of tiles or volumes (hpcfl/tasks/segment)")
    mil: MilConfig = _f(MilConfig(), help="task mil: gated attention MIL on slide labels (hpcfl/tasks/mil.py)")
    pipeline: Optional[PipelineConfig] = _f(None, help="stages `hpcfl launch` runs before this config's federation (configs/pathology.yaml)")
    observe: ObserveConfig = _f(ObserveConfig(), help="TensorBoard and MLflow logging of the metrics")

    @property
    def world_size(self) -> int:
        return 1 + sum(s.ranks for s in self.sites)

    def site_local(self, site: SiteConfig) -> Tuple[Optional[int], Optional[int]]:
        """(epochs, steps) a site trains per round; exactly one is not None."""
        steps = site.overrides.local_steps
        epochs = site.overrides.local_epochs
        if steps is None and epochs is None:
            steps, epochs = self.fl.local_steps, self.fl.local_epochs
        if steps is None:
            return (epochs or 1), None
        return None, steps


# --------------------------------------------------------------------------
# dict -> dataclass


def _suggest(word: str, options: Sequence[str]) -> str:
    opts = list(options)
    close = difflib.get_close_matches(word, opts, n=1, cutoff=0.6) or \
        [o for o in opts if len(o) > 1 and (word.startswith(o) or o.startswith(word))][:1] or \
        difflib.get_close_matches(word, opts, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        if dataclasses.is_dataclass(inner[0]) and isinstance(value, bool):  # `dp: true` = the defaults, false = off
            return _build(inner[0], {}, path, src) if value else None
        return _convert(inner[0], value, path, src)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{src}: {path}: {value!r} is not one of {', '.join(map(str, args))}{_suggest(str(value), [str(a) for a in args])}"
            )
        return value
    if origin in (tuple, typing.Tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value] if not isinstance(value, Mapping) else value
            if isinstance(value, Mapping):
                raise ConfigError(f"{src}: {path}: expected a list, got a mapping")
        return tuple(_convert(args[0], v, f"{path}[{i}]", src) for i, v in enumerate(value))
    if origin in (dict, typing.Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{src}: {path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{src}: {path}: must be a finite integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{src}: {path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {path}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{src}: {path}: {value} is too large for a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{src}: {path}: must be a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {path}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a schema bug, not a user error


def _range_problem(meta: Mapping[str, Any], value: Any) -> str:
    """What is wrong with a number against a field's bounds ('' when nothing)."""
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
        return f"must be a finite number, got {value!r}"
    if "min" in meta and value < meta["min"]:
        return f"must be >= {meta['min']}, got {value}"
    if "max" in meta and value > meta["max"]:
        return f"must be <= {meta['max']}, got {value}"
    if "gt" in meta and not value > meta["gt"]:
        return f"must be > {meta['gt']}, got {value}"
    return ""


def _check_range(meta: Mapping[str, Any], value: Any, path: str, src: str) -> None:
    problem = _range_problem(meta, value)
    if problem:
        raise ConfigError(f"{src}: {path}: {problem}")


def check_arg(label: str, value: Any, key: str) -> None:
    """A command-line value checked against the range of the config key it mirrors (e.g. "data.tiles.tile_size")."""
    cls: Any = Config
    *parents, name = key.split(".")
    for part in parents:
        tp = typing.get_type_hints(cls)[part]
        cls = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), tp)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    problem = _range_problem(meta, value)
    if problem:
        raise ConfigError(f"{label}: {problem} (as the config key {key})")


MAX_SITES = 100_000  # `sites: {count: 1e9}` would otherwise build a billion dicts


def _expand_sites(raw: Any, path: str, src: str) -> Any:
    """`sites: {count: N, ranks: R}` is shorthand for N sites named site1..siteN."""
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"count", "ranks"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{src}: {_join(path, key)}: unknown key{_suggest(key, ['count', 'ranks'])}; "
                              "sites is a list of {name, ranks, overrides} or the shorthand {count, ranks}")
        count = _convert(int, raw.get("count", 1), _join(path, "count"), src)
        ranks = _convert(int, raw.get("ranks", 1), _join(path, "ranks"), src)
        _check_range({"min": 1, "max": MAX_SITES}, count, _join(path, "count"), src)
        return [{"name": f"site{i + 1}", "ranks": ranks} for i in range(count)]
    return raw


@functools.lru_cache(maxsize=None)
def _hints(cls: Any) -> Dict[str, Any]:
    """A dataclass's resolved field types, once per class: `sites: {count: 10000}` builds 10,000 SiteConfigs,
    and resolving their string annotations each time took 2 s."""
    return typing.get_type_hints(cls)


def _build(cls: Any, raw: Any, path: str, src: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: {path or '<top level>'}: expected a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{src}: {_join(path, key)}: unknown key{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        p = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{src}: {p}: required key is missing")
            continue
        value = raw[name]
        if cls is Config and name == "sites":
            value = _expand_sites(value, p, src)
        value = _convert(hints[name], value, p, src)
        _check_range(f.metadata, value, p, src)
        kwargs[name] = value
    return cls(**kwargs)


_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _validate(cfg: Config, src: str) -> None:
    if not cfg.sites:
        raise ConfigError(f"{src}: sites: at least one site is required")
    seen = set()
    for i, s in enumerate(cfg.sites):
        if not _SITE_NAME.match(s.name):
            raise ConfigError(f"{src}: sites[{i}].name: {s.name!r} must be letters, digits, '-', '_' or '.'")
        if s.name in seen:
            raise ConfigError(f"{src}: sites[{i}].name: duplicate site name {s.name!r}")
        seen.add(s.name)
        if s.overrides.local_epochs is not None and s.overrides.local_steps is not None:
            raise ConfigError(f"{src}: sites[{i}].overrides: set local_epochs or local_steps, not both")
    if cfg.fl.local_epochs is not None and cfg.fl.local_steps is not None:
        raise ConfigError(f"{src}: fl: set local_epochs or local_steps, not both")
    if cfg.run.name and not _SITE_NAME.match(cfg.run.name):
        raise ConfigError(f"{src}: run.name: {cfg.run.name!r} must be letters, digits, '-', '_' or '.'")
    _validate_fl(cfg, src)
    _validate_gpu_sharing(cfg, src)
    if cfg.data.tiles.partition == "labels" and not cfg.data.tiles.labels:
        raise ConfigError(f"{src}: data.tiles.labels: partition: labels needs a slide labels CSV with a site column")
    from .tasks.base import BUILTIN

    if cfg.task not in BUILTIN and ":" not in cfg.task:
        raise ConfigError(f"{src}: task: {cfg.task!r} is not {', '.join(BUILTIN)} or `package.module:Class`"
                          f"{_suggest(cfg.task, list(BUILTIN))}")
    if cfg.task in BUILTIN:  # a user's task is imported (and checked) when the ranks start
        from .tasks.base import task_class

        try:
            task_class(cfg.task).check_config(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None
    rank_counts = len({s.ranks for s in cfg.sites})
    if cfg.launch.slots and not rank_counts <= cfg.launch.slots <= len(cfg.sites):
        raise ConfigError(f"{src}: launch.slots: {cfg.launch.slots} slots cannot simulate {len(cfg.sites)} sites with "
                          f"{rank_counts} different rank count(s); choose between {rank_counts} and {len(cfg.sites)} "
                          "(0 = automatic)")
    _validate_assign(cfg, src)
    inj = cfg.debug.inject_failure
    if inj is not None and inj.rank >= cfg.world_size:
        raise ConfigError(f"{src}: debug.inject_failure.rank: {inj.rank} is not a rank of this {cfg.world_size}-rank federation")
    if inj is not None and inj.round > cfg.fl.rounds:
        raise ConfigError(f"{src}: debug.inject_failure.round: {inj.round} is after the last round ({cfg.fl.rounds})")
    hold = cfg.debug.hold
    if hold is not None and hold.round > cfg.fl.rounds:
        raise ConfigError(f"{src}: debug.hold.round: {hold.round} is after the last round ({cfg.fl.rounds})")


ROBUST = ("median", "trimmed_mean", "krum")


def _validate_gpu_sharing(cfg: Config, src: str) -> None:
    """Horovod averages GPU gradients with NCCL, which refuses two ranks of one process set on one GPU; the
    torch backend picks Gloo for such slots (hpcfl.site.layout), Horovod cannot."""
    c = cfg.cluster
    if cfg.site.backend != "horovod" or c.ranks_per_gpu <= 1 or cfg.train.device == "cpu" or c.gpus_per_node == 0:
        return
    if any(s.ranks > 1 for s in cfg.sites):
        raise ConfigError(f"{src}: cluster.ranks_per_gpu: {c.ranks_per_gpu} puts ranks of one site on one GPU, and "
                          "Horovod's NCCL refuses two ranks of a process set on one GPU; use site.backend: torch "
                          "(Gloo for such sites), ranks_per_gpu: 1, or train.device: cpu")


def _validate_assign(cfg: Config, src: str) -> None:
    """launch.assign: balanced moves sites between slots, so nothing may be tied to a slot."""
    if cfg.launch.assign != "balanced":
        return
    if len({s.ranks for s in cfg.sites}) > 1:
        raise ConfigError(f"{src}: launch.assign: balanced deals sites to any slot, so every site needs the same "
                          "number of ranks")
    if cfg.fl.strategy in ROBUST:
        raise ConfigError(f"{src}: launch.assign: balanced works with mean-based strategies; {cfg.fl.strategy} "
                          "gathers each site's update in a fixed slot layout (use launch.assign: static)")
    if cfg.privacy.exclude_vars:
        raise ConfigError(f"{src}: launch.assign: balanced cannot keep privacy.exclude_vars entries per site "
                          "(they stay in the slot that holds them); use launch.assign: static")


def _validate_fl(cfg: Config, src: str) -> None:
    """Combinations that cannot work, refused before any rank starts."""
    fl, pv, k = cfg.fl, cfg.privacy, len(cfg.sites)
    if fl.min_sites > k:
        raise ConfigError(f"{src}: fl.min_sites: {fl.min_sites} is more than the {k} sites")
    if fl.sampling.min_sites > k:
        raise ConfigError(f"{src}: fl.sampling.min_sites: {fl.sampling.min_sites} is more than the {k} sites")
    if fl.strategy in ROBUST:
        if pv.secure_aggregation is not None:
            raise ConfigError(f"{src}: privacy.secure_aggregation: {fl.strategy} needs each site's update, which "
                              "secure aggregation hides from rank 0; use a mean-based strategy")
        if pv.dp is not None:
            raise ConfigError(f"{src}: privacy.dp: DP-FedAvg's noise calibration assumes a sum of clipped updates; "
                              f"it is not defined for {fl.strategy}")
    if fl.strategy == "krum":
        f = fl.robust.byzantine
        if k < 2 * f + 3:
            raise ConfigError(f"{src}: fl.robust.byzantine: Krum with f={f} needs at least {2 * f + 3} sites, "
                              f"the federation has {k}")
        if fl.robust.krum_keep > k - f:
            raise ConfigError(f"{src}: fl.robust.krum_keep: {fl.robust.krum_keep} is more than sites - byzantine "
                              f"({k - f})")
    if fl.strategy == "trimmed_mean" and 2 * int(fl.robust.trim_fraction * k) >= k:
        raise ConfigError(f"{src}: fl.robust.trim_fraction: trimming {int(fl.robust.trim_fraction * k)} of {k} "
                          "sites at each end leaves none")
    if pv.dp is not None and pv.dp.adaptive and pv.dp.noise_multiplier > 0 \
            and pv.dp.count_noise_multiplier <= pv.dp.noise_multiplier / 2:
        raise ConfigError(f"{src}: privacy.dp.count_noise_multiplier: must be > noise_multiplier / 2 "
                          f"({pv.dp.noise_multiplier / 2}) for adaptive clipping to leave budget for the updates")
    for i, pat in enumerate(pv.exclude_vars):
        try:
            re.compile(pat)
        except re.error as exc:
            raise ConfigError(f"{src}: privacy.exclude_vars[{i}]: {pat!r} is not a regular expression: {exc}") from None


# --------------------------------------------------------------------------
# overrides and loading


_INDEX = re.compile(r"^[0-9]{1,9}$")  # a list index in a --set key path (str.isdigit accepts '²')

# An override of one of these replaces the other, which the file may have set.
_EXCLUSIVE = {"local_steps": "local_epochs", "local_epochs": "local_steps"}


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` (value parsed as YAML) to a raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key.path=value")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {assignment}: empty key path")
    value = parse_yaml(text, source=f"--set {key}") if text.strip() else ""
    node: Any = raw
    if len(parts) > 1 and parts[0] == "sites" and _INDEX.match(parts[1]) and isinstance(raw.get("sites"), Mapping):
        raw["sites"] = _expand_sites(raw["sites"], "sites", f"--set {key}")  # {count, ranks} -> a list to index
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not _INDEX.match(part) or int(part) >= len(node):
                raise ConfigError(f"--set {assignment}: {where}: index out of range (list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                if part in _EXCLUSIVE and value is not None:
                    node.pop(_EXCLUSIVE[part], None)
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {assignment}: {where}: cannot set a key inside a scalar")


# Keys that moved: (old path) -> (new path). Configs (and run directories' config.yaml) written
# before the move still load, so an older run can be resumed.
_MOVED = {("train", "backend"): ("site", "backend")}


def _migrate(raw: dict) -> None:
    for old, new in _MOVED.items():
        node = raw.get(old[0])
        if isinstance(node, dict) and old[1] in node:
            value = node.pop(old[1])
            target = raw.setdefault(new[0], {})
            if isinstance(target, dict):
                target.setdefault(new[1], value)


def from_dict(raw: Any, source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    import copy

    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    _migrate(raw)
    for o in overrides:
        apply_override(raw, o)
    cfg = _build(Config, raw, "", source)
    _validate(cfg, source)
    if not cfg.run.name and source not in ("<dict>", "<string>"):
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=Path(source).stem))
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="run"))
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, override and validate a YAML config; raises ConfigError naming file and key."""
    p = Path(path)
    return from_dict(parse_yaml(read_config_text(p), str(p)), str(p), overrides)


def to_dict(cfg: Any) -> Any:
    """Plain-Python form of a config (tuples become lists), for YAML/JSON output."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Config) -> str:
    d = to_dict(cfg)
    short = _sites_shorthand(cfg.sites)
    if short is not None:
        d["sites"] = short
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)


def _sites_shorthand(sites: Sequence[SiteConfig]) -> Optional[Dict[str, int]]:
    """``{count, ranks}`` for a long list of sites that the shorthand would give back exactly (a run's
    config.yaml for 10,000 sites was 1.4 MB, and PyYAML took minutes to read it back for the report)."""
    if len(sites) <= 256 or len({s.ranks for s in sites}) != 1:
        return None
    plain = SiteOverrides()
    if any(s.name != f"site{i + 1}" or s.overrides != plain or s.dropout != 0.0 or s.speed != 1.0
           for i, s in enumerate(sites)):
        return None
    return {"count": len(sites), "ranks": sites[0].ranks}


# Keys that may change between a run and its resumption without changing what
# the completed rounds mean: more rounds, where the run lives, how it is launched.
_HASH_EXCLUDED = {("fl", "rounds"), ("run", "name"), ("run", "root"), ("launch",), ("debug",), ("checkpoint",), ("eval",),
                  ("cluster",), ("observe",), ("fault",), ("pipeline",)}


def trajectory_dict(cfg: Any) -> dict:
    """The part of a config (object or plain dict) that determines the training trajectory."""
    import copy

    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else copy.deepcopy(cfg)
    for key in _HASH_EXCLUDED:
        node = d
        for k in key[:-1]:
            node = node.get(k, {})
        node.pop(key[-1], None)
    return d


def config_hash(cfg: Config) -> str:
    """Hash of everything that determines the training trajectory (not rounds, paths or launch)."""
    blob = json.dumps(trajectory_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reference(cls: Any = Config, prefix: str = "") -> list:
    """(key path, type, default, help) rows for the documentation's config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference(tp, p))
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if inner:
            rows.extend(reference(inner[0], p + ("[]" if typing.get_origin(tp) in (tuple,) else "")))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")  # type: ignore[misc]
        rows.append((p, _typename(tp), default, f.metadata.get("help", "")))
    return rows


def _typename(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_typename(a) for a in args if a is not type(None)) + " or null"
    if origin is Literal:
        return " \\| ".join(map(str, args))
    if origin in (tuple, typing.Tuple):
        return f"list of {_typename(args[0])}"
    if origin in (dict, typing.Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def reference_markdown() -> str:
    """The config reference table of README.md (a test keeps the two in sync)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in reference():
        d = "required" if default == "required" else f"`{json.dumps(to_dict(default))}`"
        lines.append(f"| `{key}` | {tp} | {d} | {help_} |")
    return "\n".join(lines)
