"""Models, and the flat buffer through which they travel.

Every floating-point parameter and buffer of the model is re-pointed into ONE
contiguous float32 tensor (:class:`FlatModel`), on the rank's device. MPI
receives the global model straight into the weights (on a GPU: through a pinned
staging buffer, :mod:`hpcfl.device`), a site broadcasts one tensor, and an
upload is one buffer: no per-tensor messages, no pickling, no extra copies.
The trainable parameters come first and their gradients are collected into one
flat gradient tensor too, so gradient averaging is one allreduce and an
optimizer step a few elementwise ops (:mod:`hpcfl.site.optim`); where nothing
needs that tensor (plain SGD on one CPU rank), the step reads autograd's
gradients as they are.

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
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    offset: int
    numel: int


class FlatModel:
    """A torch module whose float state lives in one contiguous float32 tensor ``flat``.

    Layout: the parameters named in ``trainable`` (all parameters with
    ``requires_grad`` by default), in module order, then every other float entry
    of the state dict. ``grad`` is the flat gradient of the trainable prefix
    ``flat[:num_trainable]``. On the CPU, ``array`` is ``flat``'s NumPy view, which
    MPI sends and receives in place; on a GPU it is None.
    """

    def __init__(self, module: Any, trainable: Optional[Iterable[str]] = None, device: Any = None):
        import torch

        if device is not None:
            module = module.to(device)
        self.module = module
        state = {n: t for n, t in module.state_dict(keep_vars=True).items() if torch.is_floating_point(t)}
        for name, t in state.items():
            if t.dtype != torch.float32:
                raise ConfigError(f"model: {name} is {t.dtype}; hpcfl exchanges float32 weights, convert the model with .float()")
        params = dict(module.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad] if trainable is None else list(trainable)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ConfigError(f"model: trainable entries {unknown[:3]} are not parameters of the model")
        order = names + [n for n in state if n not in set(names)]
        entries: List[Entry] = []
        offset = 0
        for name in order:
            t = state[name]
            entries.append(Entry(name, tuple(t.shape), offset, t.numel()))
            offset += t.numel()
        self.entries = tuple(entries)
        self.numel = offset
        self.num_trainable = sum(state[n].numel() for n in names)
        dev = next((t.device for t in state.values()), torch.device("cpu"))
        self.device = dev
        self.flat = torch.zeros(offset, dtype=torch.float32, device=dev)
        self.array = self.flat.numpy() if dev.type == "cpu" else None
        self.grad = torch.zeros(self.num_trainable, dtype=torch.float32, device=dev)
        # Re-point every entry into the flat buffer, keeping current values.
        owners = {}
        for mod_name, mod in module.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None:
                    owners[_join(mod_name, pname)] = (mod, "_parameters", pname)
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    owners[_join(mod_name, bname)] = (mod, "_buffers", bname)
        trainable_set = set(names)
        self._grads: List[Tuple[Any, Any]] = []  # (parameter, its view of ``grad``)
        with torch.no_grad():
            for e in self.entries:
                t = state[e.name]
                view = self.flat[e.offset:e.offset + e.numel].view(e.shape)
                view.copy_(t.detach())
                mod, kind, key = owners[e.name]
                if kind == "_parameters":
                    t.data = view
                    if e.name in trainable_set:
                        t.grad = self.grad[e.offset:e.offset + e.numel].view(e.shape)
                        self._grads.append((t, t.grad))
                else:
                    mod._buffers[key] = view

    def release_grads(self) -> None:
        """Before a backward pass: no gradient tensors, so that autograd hands each fresh gradient over
        instead of adding it into a zeroed view. Zeroing and adding are four passes over the gradient
        where :meth:`collect_grads` is two (one copy)."""
        for p, _ in self._grads:
            p.grad = None

    def collect_grads(self) -> None:
        """After the backward pass: the gradients into ``grad`` (zeros for parameters the loss did not
        reach), and each parameter's ``grad`` its view of it again."""
        import torch

        fresh, views = [], []
        for p, view in self._grads:
            g = p.grad
            if g is None:
                view.zero_()
            elif g.is_sparse:  # an Embedding(sparse=True): densified, as adding it into the view did
                view.copy_(g.to_dense())
            elif g is not view:
                fresh.append(g)
                views.append(view)
            p.grad = view
        if fresh:
            torch._foreach_copy_(views, fresh)

    def views(self) -> List[Any]:
        """The trainable parameters, in layout order (each a view of ``flat``)."""
        return [p for p, _ in self._grads]

    @property
    def nbytes(self) -> int:
        return self.numel * 4

    def signature(self) -> str:
        """Names, shapes and offsets: two processes can exchange buffers iff these match."""
        return layout_signature(self.entries)

    def slices(self, names: Iterable[str]) -> List[Tuple[int, int]]:
        """``(start, stop)`` ranges of the flat buffer holding ``names``, adjacent ranges merged."""
        return entry_slices(self.entries, names)

    def state_dict(self) -> dict:
        return self.module.state_dict()


def entry_slices(entries: Sequence[Entry], names: Iterable[str]) -> List[Tuple[int, int]]:
    wanted = set(names)
    out: List[Tuple[int, int]] = []
    for e in sorted((e for e in entries if e.name in wanted), key=lambda e: e.offset):
        if out and out[-1][1] == e.offset:
            out[-1] = (out[-1][0], e.offset + e.numel)
        else:
            out.append((e.offset, e.offset + e.numel))
    return out


def same_state(a: Sequence[Entry], b_names_shapes: Iterable[Tuple[str, Sequence[int]]]) -> bool:
    """Whether a layout holds the same named entries (shapes included) as another, in any order."""
    return sorted((e.name, tuple(e.shape)) for e in a) == sorted((n, tuple(s)) for n, s in b_names_shapes)


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
    if m.stain_jitter > 0 and m.name != "cnn":
        raise ConfigError(f"model.stain_jitter: only the built-in cnn applies it (model.name is {m.name!r}); "
                          "set it to 0 or augment colour in your own model")
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
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        if m.stain_jitter > 0:  # same layer names; in evaluation mode the plain Sequential
            from .stain import jittered_sequential

            return jittered_sequential(m.stain_jitter, *layers)
        return nn.Sequential(*layers)
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
