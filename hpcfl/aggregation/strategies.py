"""Server-side aggregation strategies: what rank 0 does with the sites' updates.

Sites upload updates ``delta_s = w_local_s - w_global``. A strategy's ``kind`` names the
aggregation kind (:mod:`hpcfl.protocol.kinds`) that moves them, which is decided by the math:

* ``"mean"`` (FedAvg/FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad): the rule only
  needs the sample-weighted mean update, a sum, so the kind MPI-Reduces it, shows the sum
  to :meth:`Strategy.on_sum` (privacy wrappers: DP noise) and calls :meth:`Strategy.finalize`. No per-site data ever reaches rank 0.
* ``"coordinate"`` (median, trimmed mean): not a sum; the kind gathers the
  sites' updates chunk by chunk, calls :meth:`Strategy.aggregate_chunk` per chunk to
  fill a model-sized ``agg`` buffer, then calls :meth:`Strategy.finalize` with it.
* ``"select"`` (Krum, Multi-Krum): the kind gathers chunks into
  :meth:`Strategy.accumulate_distances` (after :meth:`Strategy.begin_round`), asks
  :meth:`Strategy.select` which sites to keep, Reduces the sample-weighted mean of the
  kept sites and calls :meth:`Strategy.finalize` with it.

Memory: rank 0 must hold a constant number of model-sized buffers. ``finalize``
works in place in chunks (see :mod:`.fedopt`), and a strategy's own model-sized state
is reported by :meth:`Strategy.memory_copies`. :meth:`Strategy.state_dict` returns the
live state buffers, not copies (a copy of 100M floats is what we are avoiding):
serialize them before the next ``finalize``.
"""
from __future__ import annotations

from abc import ABC
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import numpy as np

from . import fedopt as _fedopt
from . import robust as _robust


class Strategy(ABC):
    """Base server rule; the default ``finalize`` is plain ``weights += delta``."""

    name: str = "base"
    kind: str = "mean"  # "mean" | "coordinate" | "select"

    def begin_round(self, num_sites: int) -> None:
        """Called by the kind before a round's data arrives."""

    def finalize(self, delta: np.ndarray, weights: np.ndarray, round_: int) -> None:
        """Turn the aggregated update ``delta`` into the new global model, in place in ``weights``.

        ``delta`` may be used as scratch by subclasses; this default leaves it as is.
        """
        _fedopt.add_inplace(weights, delta)

    def aggregate_chunk(self, updates: np.ndarray, num_samples: np.ndarray, out: np.ndarray) -> None:
        """Aggregate a ``(K, c)`` chunk of site updates into ``out`` (``coordinate`` kind only)."""
        raise NotImplementedError(f"{self.name} is a {self.kind!r}-kind rule; aggregate_chunk is for 'coordinate'")

    def accumulate_distances(self, updates: np.ndarray) -> None:
        """Add a ``(K, c)`` chunk's pairwise squared distances (``select`` kind only)."""
        raise NotImplementedError(f"{self.name} is a {self.kind!r}-kind rule; accumulate_distances is for 'select'")

    def select(self, num_samples: np.ndarray) -> np.ndarray:
        """Boolean mask (K,) of the sites kept this round (``select`` kind only)."""
        raise NotImplementedError(f"{self.name} is a {self.kind!r}-kind rule; select is for 'select'")

    def on_sum(self, acc: np.ndarray, back: np.ndarray, rows: Mapping[int, Any]) -> Dict[str, Any]:
        """Called by a mean-taking kind with the received sum of weighted updates, before it becomes a mean
        (``back``: the sites whose updates count; ``rows``: their TrainRows). Privacy wrappers act here
        (DP noise); returns what the round's record says about it."""
        return {}

    def upload_clip(self) -> float:
        """The L2 norm sites clip their update to this round (0: no clipping)."""
        return 0.0

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Everything needed for an exact resume; empty for stateless rules."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Exact inverse of :meth:`state_dict`. An empty mapping means a fresh start."""
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state)}")

    def get_extra_state(self) -> Dict[str, Any]:
        """State that is not arrays (JSON: a privacy wrapper's clip norm and ledger); torch.nn.Module's name."""
        return {}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`get_extra_state`; ``state`` may hold other parts' keys, to be ignored."""

    def memory_copies(self) -> int:
        """Number of model-sized buffers this strategy holds."""
        return 0

    # -- site-side hooks: what a rule asks of the sites (called in site processes) -----------------------
    def upload_weight(self, num_train: int) -> float:
        """The weight a site's update gets in a mean: its number of training samples (FedAvg)."""
        return float(num_train)

    def has_local_penalty(self) -> bool:
        return False

    def local_penalty(self, params, anchors) -> Optional[object]:
        """A term added to every local training loss (torch tensors: ``params`` are the trainable
        parameters, ``anchors`` the global model's values of them), or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): ``w += mean_delta``. Also FedProx's server side."""

    name = "fedavg"

    def __init__(self, name: str = "fedavg") -> None:
        self.name = name


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg whose sites add mu/2 |w - w_global|^2 to their local loss,
    which keeps local models near the global one on heterogeneous data."""

    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if proximal_mu <= 0:
            raise ValueError(f"fl.proximal_mu must be > 0, got {proximal_mu}")
        self.mu = float(proximal_mu)

    def has_local_penalty(self) -> bool:
        return True

    def local_penalty(self, params, anchors):
        return 0.5 * self.mu * sum(((p - g) ** 2).sum() for p, g in zip(params, anchors))


class _Stateful(Strategy):
    """A ``mean``-kind server optimizer with model-sized float32 state buffers, allocated lazily."""

    buffers: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: Optional[Dict[str, np.ndarray]] = None
        self.step = 0  # number of finalize calls so far

    def _ensure_state(self, weights: np.ndarray) -> Dict[str, np.ndarray]:
        if self._state is None:
            self._state = self._initial_state(weights.shape)
        size = next(iter(self._state.values())).shape
        if size != weights.shape:
            raise ValueError(f"{self.name} state has shape {size} but the model has shape {weights.shape} "
                             f"(checkpoint from a different model?)")
        return self._state

    def _initial_state(self, shape: Tuple[int, ...]) -> Dict[str, np.ndarray]:
        return {k: np.zeros(shape, np.float32) for k in self.buffers}

    def finalize(self, delta: np.ndarray, weights: np.ndarray, round_: int) -> None:
        if delta.shape != weights.shape:
            raise ValueError(f"delta has shape {delta.shape}, weights {weights.shape}")
        self._step(delta, weights, self._ensure_state(weights))
        self.step += 1

    def _step(self, delta: np.ndarray, weights: np.ndarray, state: Dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, np.ndarray]:
        if self._state is None:
            return {}
        return {"step": np.array(self.step, np.int64), **self._state}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            self._state, self.step = None, 0
            return
        expected = {"step", *self.buffers}
        missing, unknown = expected - set(state), set(state) - expected
        if missing or unknown:
            raise ValueError(f"bad {self.name} state: missing keys {sorted(missing)}, unknown keys {sorted(unknown)} "
                             f"(expected {sorted(expected)})")
        step = np.asarray(state["step"])
        if step.shape != () or not np.issubdtype(step.dtype, np.integer) or int(step) < 0:
            raise ValueError(f"bad {self.name} state: 'step' must be a non-negative integer scalar, "
                             f"got dtype {step.dtype} shape {step.shape}")
        arrays = {k: np.asarray(state[k]) for k in self.buffers}
        shape = arrays[self.buffers[0]].shape
        for k, a in arrays.items():
            if a.ndim != 1 or a.shape != shape:
                raise ValueError(f"bad {self.name} state: {k!r} has shape {a.shape}, expected a 1-D array "
                                 f"shaped like {self.buffers[0]!r} {shape}")
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"bad {self.name} state: {k!r} has dtype {a.dtype}, expected float32")
        self._state = {k: np.array(a, dtype=np.float32, copy=True) for k, a in arrays.items()}
        self.step = int(step)

    def memory_copies(self) -> int:
        return len(self.buffers)


class FedAvgM(_Stateful):
    """FedAvgM (Hsu et al. 2019): ``v = beta*v + delta; w += server_lr * v``."""

    name = "fedavgm"
    buffers = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        if server_lr <= 0:
            raise ValueError(f"fl.server.lr must be > 0, got {server_lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"fl.server.momentum must be in [0, 1), got {momentum}")
        self.server_lr, self.momentum = float(server_lr), float(momentum)

    def _step(self, delta, weights, state):
        _fedopt.fedavgm_step(weights, delta, state["momentum"], self.server_lr, self.momentum)


class _Adaptive(_Stateful):
    """FedOpt (Reddi et al. 2021, Alg. 2): m and v start at 0 and tau^2; no bias correction."""

    buffers = ("m", "v")
    variant = "adam"
    default_beta1 = 0.9

    def __init__(self, server_lr: float = 1e-2, beta1: Optional[float] = None, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__()
        beta1 = self.default_beta1 if beta1 is None else beta1
        if server_lr <= 0:
            raise ValueError(f"fl.server.lr must be > 0, got {server_lr}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"fl.server.beta1 must be in [0, 1), got {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"fl.server.beta2 must be in [0, 1), got {beta2}")
        if tau <= 0:
            raise ValueError(f"fl.server.tau must be > 0, got {tau}")
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)

    def _initial_state(self, shape):
        return {"m": np.zeros(shape, np.float32), "v": np.full(shape, self.tau ** 2, np.float32)}

    def _step(self, delta, weights, state):
        _fedopt.adam_step(weights, delta, state["m"], state["v"], self.server_lr, self.beta1, self.beta2,
                          self.tau, variant=self.variant)


class FedAdam(_Adaptive):
    name, variant, default_beta1 = "fedadam", "adam", 0.9


class FedYogi(_Adaptive):
    name, variant, default_beta1 = "fedyogi", "yogi", 0.9


class FedAdagrad(_Adaptive):
    name, variant, default_beta1 = "fedadagrad", "adagrad", 0.0


class Median(Strategy):
    """Coordinate-wise median (Yin et al. 2018); unweighted: ignores ``num_samples``."""

    name, kind = "median", "coordinate"

    def aggregate_chunk(self, updates, num_samples, out):
        _robust.median_chunk(updates, out)


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop floor(beta*K) at each end; unweighted."""

    name, kind = "trimmed_mean", "coordinate"

    def __init__(self, trim_fraction: float = 0.1) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"fl.robust.trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = float(trim_fraction)

    def begin_round(self, num_sites: int) -> None:
        _robust.num_trimmed(num_sites, self.trim_fraction)  # fail before any data moves

    def aggregate_chunk(self, updates, num_samples, out):
        _robust.trimmed_mean_chunk(updates, self.trim_fraction, out)


class Krum(Strategy):
    """Krum / Multi-Krum (Blanchard et al. 2017); selection ignores ``num_samples``.

    Holds only a (K, K) float64 distance matrix and a chunk-sized float64 scratch.
    """

    name, kind = "krum", "select"

    def __init__(self, byzantine: int = 1, keep: int = 1) -> None:
        if byzantine < 0:
            raise ValueError(f"fl.robust.byzantine must be >= 0, got {byzantine}")
        if keep < 1:
            raise ValueError(f"fl.robust.krum_keep must be >= 1, got {keep}")
        self.byzantine, self.keep = int(byzantine), int(keep)
        self._dist: Optional[np.ndarray] = None
        self._scratch: Optional[np.ndarray] = None
        self.last_scores: Optional[np.ndarray] = None

    def begin_round(self, num_sites: int) -> None:
        _robust.check_krum(num_sites, self.byzantine)
        if self.keep > num_sites:
            raise ValueError(f"fl.robust.krum_keep={self.keep} exceeds the {num_sites} participating sites")
        self._dist = np.zeros((num_sites, num_sites), np.float64)
        self.last_scores = None

    def accumulate_distances(self, updates: np.ndarray) -> None:
        if self._dist is None:
            raise RuntimeError("Krum.accumulate_distances called before begin_round")
        c = updates.shape[1] if updates.ndim == 2 else 0
        if self._scratch is None or self._scratch.shape[0] < c:
            self._scratch = np.empty(c, np.float64)
        _robust.accumulate_sq_distances(updates, self._dist, self._scratch)

    @property
    def distances(self) -> Optional[np.ndarray]:
        """The (K, K) squared distances accumulated this round."""
        return self._dist

    def select(self, num_samples: np.ndarray) -> np.ndarray:
        if self._dist is None:
            raise RuntimeError("Krum.select called before begin_round")
        if len(num_samples) != self._dist.shape[0]:
            raise ValueError(f"got {len(num_samples)} sample counts for {self._dist.shape[0]} sites")
        self.last_scores = _robust.krum_scores_from_distances(self._dist, self.byzantine)
        return _robust.multikrum_select_from_distances(self._dist, self.byzantine, self.keep)


STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum")


def _int_param(params: Mapping[str, float], key: str, default: int) -> int:
    v = params.get(key, default)
    if float(v) != int(v):
        raise ValueError(f"{key} must be an integer, got {v}")
    return int(v)


def make_strategy(name: str, params: Optional[Mapping[str, float]] = None) -> Strategy:
    """Build a strategy by name; ``params`` keys a strategy does not use are ignored.

    Keys: server_lr, server_momentum, beta1, beta2, tau, trim_fraction, byzantine, krum_keep, proximal_mu.
    """
    p = dict(params or {})

    def pick(*keys: str) -> Dict[str, float]:
        return {k: float(p[k]) for k in keys if k in p}

    if name == "fedavg":
        return FedAvg(name)
    if name == "fedprox":
        return FedProx(**pick("proximal_mu"))
    if name == "fedavgm":
        kw = pick("server_lr")
        if "server_momentum" in p:
            kw["momentum"] = float(p["server_momentum"])
        return FedAvgM(**kw)
    adaptive: Dict[str, Type[_Adaptive]] = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    if name in adaptive:
        return adaptive[name](**pick("server_lr", "beta1", "beta2", "tau"))
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        return TrimmedMean(**pick("trim_fraction"))
    if name == "krum":
        return Krum(byzantine=_int_param(p, "byzantine", 1), keep=_int_param(p, "krum_keep", 1))
    raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


__all__ = ["Strategy", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Median", "TrimmedMean", "Krum",
           "STRATEGIES", "make_strategy"]
