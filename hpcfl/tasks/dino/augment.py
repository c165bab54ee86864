"""DINO's multi-crop augmentation, on whole batches.

Every transform is one vectorised tensor operation over the batch, with
per-sample random parameters drawn from torch's global generator on the
batch's device (seeded by the trainer, so a round is reproducible): random
resized crops with flips and 90-degree rotations in one ``affine_grid`` +
``grid_sample``, colour jitter as per-sample factors, Gaussian blur as one
grouped convolution with a kernel per sample, solarisation as a mask.
Images are in [0, 1] on the way in; crops come out normalised.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

# Normalisation applied to every crop and to the whole tiles the evaluation sees.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_PAIRS: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}


def _yiq(device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(YIQ matrix, its inverse) on a device, inverted ONCE per device and dtype: torch.linalg.inv checks for a
    singular matrix on the host, a sync of the GPU's queue at every step otherwise."""
    key = (torch.device(device), dtype)
    if key not in _YIQ_PAIRS:
        yiq = torch.tensor(_YIQ, device=device, dtype=dtype)
        _YIQ_PAIRS[key] = (yiq, torch.linalg.inv(yiq))
    return _YIQ_PAIRS[key]


def normalize(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    mean = torch.tensor(MEAN[:c] if c == 3 else (0.5,) * c, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
    std = torch.tensor(STD[:c] if c == 3 else (0.25,) * c, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=like.device, dtype=like.dtype)


def _coin(p, n: int, like: torch.Tensor) -> torch.Tensor:
    """Per-sample Bernoulli draws; ``p`` is a float or a tensor of n probabilities."""
    return torch.rand(n, device=like.device, dtype=like.dtype) < p


def crop_params(n: int, scale: Sequence[float], flip: bool, rotate: bool, like: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) ``affine_grid`` matrices: crops of area fraction in ``scale`` and aspect ratio in
    [3/4, 4/3] at random positions inside the image, randomly flipped and rotated by 90 degrees.

    As torchvision's RandomResizedCrop on a square image, except that a crop that would not fit
    gets the nearest aspect ratio that fits (area a fits with ratios in [a, 1/a]), where torchvision
    redraws it up to 10 times and then falls back to the whole image."""
    area = _uniform(n, float(scale[0]), float(scale[1]), like)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), like)
    fit = torch.log(area)  # <= 0
    ratio = torch.exp(torch.maximum(torch.minimum(log_ratio, -fit), fit))
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the image side (clamp: rounding only)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * torch.rand(n, device=like.device, dtype=like.dtype) - 1) * (1 - w)  # centre, normalised coordinates
    cy = (2 * torch.rand(n, device=like.device, dtype=like.dtype) - 1) * (1 - h)
    one = torch.ones(n, device=like.device, dtype=like.dtype)
    sx = torch.where(_coin(0.5, n, like), -one, one) if flip else one
    sy = torch.where(_coin(0.5, n, like), -one, one) if flip else one
    rot = _coin(0.5, n, like) if rotate else torch.zeros(n, dtype=torch.bool, device=like.device)
    # A = diag(w, h) @ R @ diag(sx, sy), with R the identity or a quarter turn [[0, -1], [1, 0]].
    zero = torch.zeros_like(one)
    a00 = torch.where(rot, zero, w * sx)
    a01 = torch.where(rot, -w * sy, zero)
    a10 = torch.where(rot, h * sx, zero)
    a11 = torch.where(rot, zero, h * sy)
    return torch.stack([torch.stack([a00, a01, cx], 1), torch.stack([a10, a11, cy], 1)], 1)


def resized_crops(x: torch.Tensor, views: int, size: int, scale: Sequence[float], flip: bool = True,
                  rotate: bool = True) -> torch.Tensor:
    """``views`` random resized crops of every image, view-major: rows [v * B, (v + 1) * B) are view v."""
    b, c = x.shape[:2]
    theta = crop_params(views * b, scale, flip, rotate, x.float())
    grid = F.affine_grid(theta.to(x.dtype), [views * b, c, size, size], align_corners=False)
    src = x.repeat(views, 1, 1, 1) if views > 1 else x
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def colour(x: torch.Tensor, jitter: float, hue: float, jitter_prob: float, grayscale_prob: float) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (each crop with probability ``jitter_prob``),
    then greyscale with probability ``grayscale_prob``. Single-channel images get brightness and
    contrast only."""
    n = len(x)
    if n == 0:
        return x
    on = _coin(jitter_prob, n, x).to(x.dtype).view(n, 1, 1, 1)
    fac = lambda: 1 + on * (_uniform(n, -jitter, jitter, x).view(n, 1, 1, 1))  # noqa: E731 - 1 where off
    x = (x * fac()).clamp(0, 1)  # brightness
    if x.shape[1] != 3:
        m = x.mean((1, 2, 3), keepdim=True)
        return ((x - m) * fac() + m).clamp(0, 1)
    m = _gray(x).mean((2, 3), keepdim=True)
    x = ((x - m) * fac() + m).clamp(0, 1)  # contrast
    g = _gray(x)
    x = ((x - g) * fac() + g).clamp(0, 1)  # saturation
    if hue > 0:
        turn = on.view(n) * _uniform(n, -hue, hue, x) * (2 * math.pi)
        cos, sin = torch.cos(turn), torch.sin(turn)
        rot = torch.zeros(n, 3, 3, device=x.device, dtype=x.dtype)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        yiq, inv = _yiq(x.device, x.dtype)
        m = inv @ rot @ yiq  # (n, 3, 3)
        x = torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)
    if grayscale_prob > 0:
        grey = _coin(grayscale_prob, n, x).view(n, 1, 1, 1)
        x = torch.where(grey, _gray(x).expand_as(x), x)
    return x


def blur(x: torch.Tensor, prob: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Gaussian blur of each image with probability ``prob[i]`` and sigma uniform in ``sigma``
    (pixels): one separable grouped convolution with a kernel per image, reflected borders."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    radius = max(1, min(math.ceil(3 * float(sigma[1])), (min(h, w) - 1) // 2))
    s = _uniform(n, float(sigma[0]), float(sigma[1]), x).view(n, 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
    k = torch.exp(-0.5 * (taps / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    return torch.where(_coin(prob, n, x).view(n, 1, 1, 1), y, x)


def solarize(x: torch.Tensor, prob) -> torch.Tensor:
    on = _coin(prob, len(x), x).view(-1, 1, 1, 1)
    return torch.where(on & (x >= 0.5), 1 - x, x)


def multicrop(x: torch.Tensor, c) -> Tuple[torch.Tensor, torch.Tensor]:
    """(global crops, local crops) of a batch of images in [0, 1], from a ``DinoCropsConfig``.

    Global: (2 B, C, g, g), view-major (rows [0, B) the first view of every image, [B, 2B) the
    second); the first view is always blurred in DINO, the second rarely but may be solarized.
    Local: (n B, C, l, l), view-major likewise; empty when ``c.local_crops`` is 0."""
    b = len(x)
    x = x.float()
    g = resized_crops(x, 2, c.global_size, c.global_scale, c.flip, c.rotate)
    g = colour(g, c.jitter, c.hue, c.jitter_prob, c.grayscale_prob)
    p = torch.cat([torch.full((b,), float(c.blur_prob[0])), torch.full((b,), float(c.blur_prob[1]))]).to(x.device)
    g = blur(g, p, c.blur_sigma)
    g = torch.cat([g[:b], solarize(g[b:], c.solarize_prob)])
    if c.local_crops == 0:
        return normalize(g), g.new_zeros((0, x.shape[1], c.local_size, c.local_size))
    loc = resized_crops(x, c.local_crops, c.local_size, c.local_scale, c.flip, c.rotate)
    loc = colour(loc, c.jitter, c.hue, c.jitter_prob, c.grayscale_prob)
    loc = blur(loc, torch.full((len(loc),), float(c.blur_prob[2]), device=x.device), c.blur_sigma)
    return normalize(g), normalize(loc)
