"""The array backend, chosen once: CuPy where a GPU exists, NumPy otherwise.

``data.array_backend: auto | numpy | cupy``. The same code runs on both (the
module is the only thing that changes); on CPU machines everything is NumPy.
Tile batches are assembled with it (hpcfl.wsi.batch) and handed to torch
without a copy: NumPy through ``torch.from_numpy``, CuPy through DLPack.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..errors import DependencyError


@functools.lru_cache(maxsize=None)
def array_module(name: str = "auto") -> Any:
    if name == "numpy":
        return np
    try:
        import cupy

        cupy.zeros(1).sum()  # CuPy imports without a GPU, and fails at the first operation
        return cupy
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable GPU
        if name == "cupy":
            raise DependencyError(f"data.array_backend: cupy requested but not usable here ({type(exc).__name__}: "
                                  f"{exc}); install cupy-cuda12x on a machine with a GPU, or use numpy") from None
        return np


def resolved_name(name: str) -> str:
    return "cupy" if array_module(name) is not np else "numpy"


def to_torch(a: Any):
    """A torch tensor on the same memory: ``from_numpy`` on the host, DLPack on a GPU (no copy either way)."""
    import torch

    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


def to_numpy(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def to_chw_float(rgb: np.ndarray, name: str = "numpy") -> np.ndarray:
    """HWC uint8 -> CHW float32 in [0, 1] (on the chosen backend, returned as NumPy for the transforms)."""
    xp = array_module(name)
    a = xp.asarray(rgb).astype(xp.float32) * xp.float32(1.0 / 255.0)
    return to_numpy(xp.ascontiguousarray(a.transpose(2, 0, 1)))


def saturation(rgb: np.ndarray, name: str = "numpy") -> np.ndarray:
    """HSV saturation of an RGB image (what tissue detection thresholds)."""
    xp = array_module(name)
    a = xp.asarray(rgb).astype(xp.float32)
    mx, mn = a.max(axis=2), a.min(axis=2)
    return to_numpy(xp.where(mx > 0, (mx - mn) / xp.maximum(mx, 1e-6), 0.0))
