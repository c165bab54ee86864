"""DINO's networks: a small encoder (CNN or ViT), the projection head, and the student/teacher pair.

Sized for CPU tests and tiles of a few dozen pixels. Everything that must
survive rounds and resume (both networks and the centre) is module state, so
it lives in hpcfl's flat model and in checkpoints.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError


class BasicBlock(nn.Module):
    """ResNet's basic block with GroupNorm (batch statistics would mix sites' non-IID data)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(_groups(cout), cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.skip is None else self.skip(x)))


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ConvEncoder(nn.Module):
    """Stem (stride 1) + 3 stages of ``depth`` residual blocks (width, 2 width, 4 width channels, each
    stage halving the side) + global average pooling: any input side works, so global and local
    crops share the encoder."""

    def __init__(self, in_ch: int, width: int, depth: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width),
                                  nn.ReLU())
        blocks, c = [], width
        for stage in range(3):
            cout = width * 2 ** stage
            for b in range(depth):
                blocks.append(BasicBlock(c, cout, stride=2 if b == 0 else 1))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.dim = c

    def forward(self, x):
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class ViTEncoder(nn.Module):
    """A small Vision Transformer (pre-norm blocks, CLS token); the position embedding is
    interpolated for crops of another size, as DINO does for its local crops."""

    def __init__(self, in_ch: int, size: int, width: int, depth: int, patch: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"dino.heads: {heads} does not divide dino.width ({width})")
        if size % patch:
            raise ConfigError(f"dino.patch_size: {patch} does not divide dino.crops.global_size ({size})")
        self.patch = patch
        self.grid = size // patch
        self.embed = nn.Conv2d(in_ch, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.dim = width

    def _pos(self, grid: int):
        if grid == self.grid:
            return self.pos
        cls, patches = self.pos[:, :1], self.pos[:, 1:]
        d = patches.shape[-1]
        patches = patches.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)

    def forward(self, x):
        if x.shape[-1] % self.patch or x.shape[-2] != x.shape[-1]:
            raise ConfigError(f"dino.patch_size: {self.patch} does not divide the crop side {x.shape[-1]}")
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self._pos(x.shape[-1] // self.patch)
        return self.norm(self.blocks(t))[:, 0]


class DINOHead(nn.Module):
    """MLP (optionally with BatchNorm, DINO's ``use_bn_in_head``) -> L2 normalisation ->
    weight-normalised linear layer without bias (DINO's head).

    Weight normalisation is written out (``weight = g * v / |v|`` per output row) rather than
    through torch's parametrization, so the state is two plain parameters ``v`` and ``g``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, norm_last_layer: bool,
                 batchnorm: bool = False):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden)) if batchnorm else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.v = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.v, std=0.02)
        self.g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x):
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        w = self.g * F.normalize(self.v, dim=-1, eps=1e-6)
        return z @ w.t()


class Network(nn.Module):
    """Encoder + head; ``forward`` takes crops grouped by size (one encoder call per size)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Any]):
        feats = [self.backbone(c) for c in crops if len(c)]
        return self.head(torch.cat(feats))


def make_backbone(d, in_ch: int) -> nn.Module:
    if d.backbone == "cnn":
        return ConvEncoder(in_ch, d.width, d.depth)
    return ViTEncoder(in_ch, d.crops.global_size, d.width, d.depth, d.patch_size, d.heads)


class DinoModel(nn.Module):
    """Student, teacher (an EMA copy, no gradients) and the centre: all of the task's state."""

    def __init__(self, d, in_ch: int):
        super().__init__()
        backbone = make_backbone(d, in_ch)
        head = DINOHead(backbone.dim, d.out_dim, d.head_hidden, d.head_bottleneck, d.norm_last_layer, d.head_bn)
        self.student = Network(backbone, head)
        self.teacher = copy.deepcopy(self.student)  # starts equal to the student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, d.out_dim))
        self.feature_dim = backbone.dim


class Classifier(nn.Module):
    """The DINO encoder with a linear layer on images in [0, 1] (resized to ``size`` unless 0, then
    normalised as the crops are): the supervised baseline of ``bench/dino.py``, and a model for the
    classify task (``model.name: hpcfl.tasks.dino.networks:classifier``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, size: int = 0):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.dim, num_classes)
        self.size = size

    def forward(self, x):
        from .augment import normalize

        if self.size and x.shape[-1] != self.size:
            x = resize(x, self.size)
        return self.fc(self.backbone(normalize(x)))


def resize(x, size: int):
    """Whole tiles at another side (area averaging when shrinking)."""
    mode = "area" if size < x.shape[-1] else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def classifier(num_features: int, num_classes: int, **args: Any) -> nn.Module:
    """Factory for ``model.name``: ``model.args`` are DinoConfig keys (backbone, width, depth, ...)
    and ``size``, the side tiles are resized to (default 0: as given)."""
    from .config import DinoConfig

    args = dict(args)
    size = int(args.pop("size", 0))
    d = DinoConfig(**args)
    in_ch = 3 if num_features % 3 == 0 else 1
    return Classifier(make_backbone(d, in_ch), num_classes, size)
