"""Models, and the flat buffer through which they travel.

Every floating-point parameter and buffer of the model is re-pointed into ONE
contiguous float32 tensor (:class:`FlatModel`). MPI receives the global model
straight into the weights, Horovod broadcasts one tensor per site, and an upload
is one buffer: no per-tensor messages, no pickling, no extra copies.

Non-float buffers (BatchNorm's ``num_batches_tracked``, any integer counter)
are *not* exchanged: each process keeps its own. They only matter for
BatchNorm with ``momentum=None`` (cumulative average), which we do not use.
Float buffers (BatchNorm running mean/var) are exchanged and averaged with the
same sample weights as parameters, as FedAvg implementations commonly do.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import Any, List, Tuple

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    offset: int
    numel: int


class FlatModel:
    """A torch module whose float state lives in one contiguous float32 tensor.

    ``flat`` is that tensor and ``array`` its NumPy view (CPU), which MPI can
    send and receive in place.
    """

    def __init__(self, module: Any):
        import torch

        self.module = module
        entries: List[Entry] = []
        tensors = []
        offset = 0
        for name, t in module.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(t):
                continue
            if t.dtype != torch.float32:
                raise ConfigError(f"model: {name} is {t.dtype}; hpcfl exchanges float32 weights, convert the model with .float()")
            entries.append(Entry(name, tuple(t.shape), offset, t.numel()))
            tensors.append(t)
            offset += t.numel()
        self.entries = tuple(entries)
        self.numel = offset
        self.array = np.zeros(offset, dtype=np.float32)
        self.flat = torch.from_numpy(self.array)
        # Re-point every entry into the flat buffer, keeping current values.
        owners = {}
        for mod_name, mod in module.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None:
                    owners[_join(mod_name, pname)] = (mod, "_parameters", pname)
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    owners[_join(mod_name, bname)] = (mod, "_buffers", bname)
        with torch.no_grad():
            for e, t in zip(self.entries, tensors):
                view = self.flat[e.offset:e.offset + e.numel].view(e.shape)
                view.copy_(t.detach())
                mod, kind, key = owners[e.name]
                if kind == "_parameters":
                    t.data = view
                else:
                    mod._buffers[key] = view

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def signature(self) -> str:
        """Names, shapes and offsets: two processes can exchange buffers iff these match."""
        return layout_signature(self.entries)

    def state_dict(self) -> dict:
        return self.module.state_dict()


def layout_signature(entries) -> str:
    text = ";".join(f"{e.name}:{tuple(e.shape)}:{e.offset}" for e in entries)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_views(array: np.ndarray, entries) -> dict:
    """Name -> view of a flat buffer: a framework-free state_dict (what rank 0 checkpoints)."""
    return {e.name: array[e.offset:e.offset + e.numel].reshape(e.shape) for e in entries}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build_model(cfg, num_features: int, num_classes: int, input_shape: Tuple[int, ...]) -> Any:
    """The module named by ``cfg.model`` (weights not yet synchronised)."""
    import torch.nn as nn

    m = cfg.model
    if m.name == "mlp":
        layers: List[Any] = [nn.Flatten()]
        width = num_features
        for h in m.hidden:
            layers.append(nn.Linear(width, h))
            if m.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    if m.name == "cnn":
        if len(input_shape) != 3:
            raise ConfigError(f"model.name: cnn needs image inputs (C, H, W); data {cfg.data.name!r} gives {input_shape}")
        # Small and strided: cheap enough to train tile classifiers on CPU ranks. GroupNorm, not
        # BatchNorm: averaging running statistics over non-IID sites makes the global model's
        # evaluation-mode behaviour swing from round to round (Hsieh et al., 2020).
        c, layers, width = input_shape[0], [], 16
        for i in range(m.conv_blocks):
            stride = 2 if min(input_shape[1:]) >> (i + 1) >= 4 else 1
            layers += [nn.Conv2d(c, width, 3, stride=stride, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
            c, width = width, width * 2
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    if ":" in m.name:
        mod_name, _, fn_name = m.name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model.name: cannot import {m.name!r}: {exc}") from None
        try:
            return fn(num_features=num_features, num_classes=num_classes, **m.args)
        except TypeError as exc:
            raise ConfigError(f"model.name: {m.name}(num_features=..., num_classes=..., **model.args) failed: {exc}") from None
    raise ConfigError(f"model.name: {m.name!r} is not `mlp`, `cnn` or `package.module:factory`")
