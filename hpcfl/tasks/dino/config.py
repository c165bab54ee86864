"""``task: dino``'s config section (``dino``) and the checks its per-key bounds cannot express.

It imports only :mod:`hpcfl.fields` and the errors, so the schema (hpcfl.config) includes it without
importing the task (torch): it belongs to the config layer (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from ...fields import setting as _f
from ...errors import ConfigError


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


def check(d) -> None:
    """Combinations the schema's per-key bounds cannot catch, refused with the key named."""
    c = d.crops
    for key, pair, hi in (("global_scale", c.global_scale, 1.0), ("local_scale", c.local_scale, 1.0),
                          ("blur_sigma", c.blur_sigma, None)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (hi is not None and pair[1] > hi):
            bound = f" <= {hi}" if hi is not None else ""
            raise ConfigError(f"dino.crops.{key}: expected [min, max] with 0 < min <= max{bound}, got {list(pair)}")
    if len(c.blur_prob) != 3 or not all(0 <= p <= 1 for p in c.blur_prob):
        raise ConfigError(f"dino.crops.blur_prob: expected 3 probabilities [first global, second global, local], "
                          f"got {list(c.blur_prob)}")
    if d.backbone == "vit":
        if d.width % d.heads:
            raise ConfigError(f"dino.heads: {d.heads} does not divide dino.width ({d.width})")
        for key, side in (("global_size", c.global_size), ("local_size", c.local_size)):
            if side % d.patch_size:
                raise ConfigError(f"dino.crops.{key}: {side} is not a multiple of dino.patch_size ({d.patch_size})")


__all__ = ["DinoConfig", "DinoCropsConfig", "DinoEvalConfig", "check"]
