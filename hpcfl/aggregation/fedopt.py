"""Server optimizers: FedAvgM and the adaptive FedOpt family (FedAdam, FedYogi, FedAdagrad).

The server treats the mean site update ``delta = sum_s n_s * (w_s - w) / sum_s n_s``
as a pseudo-gradient and takes one optimizer step on the global model
(Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2; Hsu et al.
2019 for server momentum). Because ``delta`` is a sample-weighted mean, it is
MPI-reducible, so every rule here is a function of the reduced vector only.

Memory: the model may be 10-100M float32 elements and rank 0 must stay at a
constant number of model-sized buffers. Every function here updates its arrays
in place and does the elementwise math in slices of at most :data:`CHUNK`
elements with ``out=`` ufuncs, so the only temporaries are chunk-sized. The
optimizer state (momentum, m, v) is owned by the caller.

Note: Algorithm 2 of Reddi et al. has no bias correction, so there is none here.
"""
from __future__ import annotations

from typing import Iterator, Literal

import numpy as np

#: Largest slice (in elements) processed at once. Read at call time, so tests may monkeypatch it.
CHUNK: int = 1 << 20

Variant = Literal["adam", "yogi", "adagrad"]


def slices(n: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, each at most :data:`CHUNK` long."""
    step = int(CHUNK)
    if step < 1:
        raise ValueError(f"CHUNK must be >= 1, got {step}")
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _check_same_shape(weights: np.ndarray, *others: np.ndarray) -> None:
    for a in others:
        if a.shape != weights.shape:
            raise ValueError(f"shape mismatch: {a.shape} vs weights {weights.shape}")


def _scratch(n: int, dtype: np.dtype) -> np.ndarray:
    return np.empty(min(int(CHUNK), n), dtype=dtype)


def add_inplace(weights: np.ndarray, delta: np.ndarray) -> None:
    """``weights += delta``, chunked (plain FedAvg server step)."""
    _check_same_shape(weights, delta)
    for s in slices(weights.size):
        np.add(weights[s], delta[s], out=weights[s])


def fedavgm_step(weights: np.ndarray, delta: np.ndarray, momentum: np.ndarray,
                 server_lr: float, beta: float) -> None:
    """FedAvgM: ``momentum = beta * momentum + delta; weights += server_lr * momentum`` (in place)."""
    _check_same_shape(weights, delta, momentum)
    tmp = _scratch(weights.size, weights.dtype)
    for s in slices(weights.size):
        v, t = momentum[s], tmp[: s.stop - s.start]
        np.multiply(v, beta, out=v)
        np.add(v, delta[s], out=v)
        np.multiply(v, server_lr, out=t)
        np.add(weights[s], t, out=weights[s])


def adam_step(weights: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray,
              lr: float, b1: float, b2: float, tau: float, variant: Variant = "adam") -> None:
    """One FedOpt step (Reddi et al. 2021, Alg. 2), in place on ``weights``, ``m`` and ``v``.

    m = b1*m + (1-b1)*delta, then
      adam:    v = b2*v + (1-b2)*delta^2
      yogi:    v = v - (1-b2)*delta^2*sign(v - delta^2)
      adagrad: v = v + delta^2
    and weights += lr * m / (sqrt(v) + tau). ``delta`` is left unchanged.
    """
    if variant not in ("adam", "yogi", "adagrad"):
        raise ValueError(f"unknown variant {variant!r} (adam, yogi or adagrad)")
    _check_same_shape(weights, delta, m, v)
    dt = weights.dtype
    t1 = _scratch(weights.size, dt)
    t2 = _scratch(weights.size, dt) if variant == "yogi" else None
    for s in slices(weights.size):
        k = s.stop - s.start
        d, mm, vv, t = delta[s], m[s], v[s], t1[:k]
        # m = b1*m + (1-b1)*d
        np.multiply(mm, b1, out=mm)
        np.multiply(d, 1.0 - b1, out=t)
        np.add(mm, t, out=mm)
        # t = d^2
        np.square(d, out=t)
        if variant == "adam":
            np.multiply(vv, b2, out=vv)
            np.multiply(t, 1.0 - b2, out=t)
            np.add(vv, t, out=vv)
        elif variant == "yogi":
            u = t2[:k]
            np.subtract(vv, t, out=u)
            np.sign(u, out=u)
            np.multiply(u, t, out=u)
            np.multiply(u, 1.0 - b2, out=u)
            np.subtract(vv, u, out=vv)
        else:
            np.add(vv, t, out=vv)
        # weights += lr * m / (sqrt(v) + tau)
        np.sqrt(vv, out=t)
        np.add(t, tau, out=t)
        np.divide(mm, t, out=t)
        np.multiply(t, lr, out=t)
        np.add(weights[s], t, out=weights[s])


__all__ = ["CHUNK", "slices", "add_inplace", "fedavgm_step", "adam_step"]
