"""Stain jitter: a training-time colour augmentation for stained tissue, applied inside the model.

Why: slides differ in stain strength and hue (staining runs, hospitals, scanners); the synthetic
slides of :mod:`hpcfl.wsi.synth` draw both per slide. A CNN trained on a few slides learns each
class's colour as well as its texture, and on a new slide every tile of a class shifts colour
together: measured on the quickstart, 16 unseen slides scored 0.64-0.99 each (necrosis called
stroma, lymphocytes called tumour), and a site that validates on one slide saw its accuracy jump
between rounds as the decision boundary moved a little. Pooling all training slides in one place
(no federation) did the same, so the cause is the colour shift, not the averaging of sites.

What: by Beer-Lambert a pixel's optical density in colour channel c, ``OD_c = -log(I_c)``
(intensities in [0, 1], 1 = glass), is a sum of stain concentrations times absorbances; a
stronger or weaker stain scales it. Each training image's OD in each channel is scaled by its own
factor ``k = exp(sigma * N(0, 1))``, i.e. ``I_c -> I_c ** k`` (white stays white, black stays
black). Independent factors per channel also shift the hue, as another stain batch does. This is
HED jitter (Tellez et al., 2018) without a stain matrix: it assumes no particular stains.

It runs in the model, in training mode only (like dropout), so every data path (host or GPU
assembly, loader workers, SmartCache) gets it; its draws come from torch's generator, which the
trainer seeds per round and rank: runs stay reproducible and resume exactly.
"""
from __future__ import annotations

import functools
from typing import Any, Optional


def scale_optical_density(x: Any, k: Any) -> Any:
    """``x ** k`` for intensities clamped to [0, 1]: the optical density ``-log(x)`` times ``k``.

    ``x``: (N, C, H, W) images; ``k``: positive factors broadcastable to it, e.g. (N, C, 1, 1).
    """
    return x.clamp(0.0, 1.0).pow(k)


def stain_jitter(x: Any, sigma: float, generator: Optional[Any] = None) -> Any:
    """Every image's channels with their optical density scaled by ``exp(sigma * N(0, 1))`` (one draw per
    image and channel, from ``generator`` or torch's default one)."""
    import torch

    z = torch.randn((x.shape[0], x.shape[1], 1, 1), generator=generator, device=x.device, dtype=x.dtype)
    return scale_optical_density(x, torch.exp(sigma * z))


def jittered_sequential(sigma: float, *layers: Any) -> Any:
    """An ``nn.Sequential`` of ``layers`` that applies :func:`stain_jitter` to its input in training mode.

    The layers keep their names ("0.weight", ...), so checkpoints and ``privacy.exclude_vars`` patterns
    read the same as without jitter; in evaluation mode the model is exactly the plain Sequential.
    """
    return _jittered_class()(sigma, *layers)


@functools.lru_cache(maxsize=None)
def _jittered_class() -> Any:
    import torch.nn as nn

    class StainJitteredSequential(nn.Sequential):
        def __init__(self, sigma: float, *layers: Any):
            super().__init__(*layers)
            self.stain_jitter = float(sigma)

        def forward(self, x):
            if self.training and self.stain_jitter > 0:
                x = stain_jitter(x, self.stain_jitter)
            return super().forward(x)

        def extra_repr(self) -> str:
            return f"stain_jitter={self.stain_jitter}"

    return StainJitteredSequential


__all__ = ["scale_optical_density", "stain_jitter", "jittered_sequential"]
