"""In-memory datasets for the federation core, and how they are split.

Sites own disjoint parts of the data (:func:`partition`), each split into
train/validation (:func:`train_val_split`); inside a site every rank trains on
its own shard of a per-epoch shuffle (:func:`epoch_shard`). All of it is pure
and seeded, so every rank computes the same split without talking to others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32, (N, *input_shape)
    y: np.ndarray  # int64, (N,)
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 8x8 images), read from its data file directly:
    importing sklearn costs each rank about a second of start-up."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.name: digits needs scikit-learn's bundled data (pip install scikit-learn)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.exists():
        raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return raw[:, :-1], raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # layout changed upstream: take the slow path

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def load_dataset(cfg) -> Dataset:
    d = cfg.data
    if d.name == "digits":
        x, y = _digits()
        return Dataset(x=(x / 16.0).reshape(-1, 1, 8, 8), y=y, num_classes=10)
    if d.name == "synthetic":
        rng = np.random.default_rng([cfg.run.seed, 7])
        means = rng.normal(0.0, 1.0, size=(d.classes, d.features)).astype(np.float32)
        y = rng.integers(0, d.classes, size=d.samples).astype(np.int64)
        x = means[y] + rng.normal(0.0, 1.5, size=(d.samples, d.features)).astype(np.float32)
        return Dataset(x=x, y=y, num_classes=d.classes)
    if d.name == "volumes":
        raise ConfigError("data.name: volumes are read by task: segment only")
    raise ConfigError(f"data.name: unknown dataset {d.name!r}")


def partition(y: np.ndarray, n_sites: int, how: str, seed: int, alpha: float = 0.5,
              min_per_site: int = 2) -> List[np.ndarray]:
    """Indices of the samples each site owns (disjoint, covering all samples).

    ``iid``: a seeded permutation cut into near-equal parts. ``dirichlet``: for
    each class, site shares drawn from Dir(alpha) (label skew, as in the FL
    literature); redrawn until every site has ``min_per_site`` samples.
    """
    n = len(y)
    if n < n_sites * min_per_site:
        raise ConfigError(f"data: {n} samples cannot be split over {n_sites} sites")
    rng = np.random.default_rng([seed, 11])
    if how == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_sites)]
    if how != "dirichlet":
        raise ConfigError(f"data.partition: unknown partition {how!r}")
    classes = np.unique(y)
    for _ in range(1000):
        parts: List[List[int]] = [[] for _ in range(n_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_site:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"data.dirichlet_alpha: {alpha} leaves some of {n_sites} sites without data; raise it")


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int, site_index: int,
                    stream: int = 13) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded split of one site's samples (or slides); both parts non-empty."""
    rng = np.random.default_rng([seed, stream, site_index])
    perm = rng.permutation(indices)
    n_val = min(max(1, int(round(len(perm) * val_fraction))), len(perm) - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_shard(train: np.ndarray, rank_in_site: int, site_size: int, seed: int, round_: int, epoch: int,
                site_index: int) -> np.ndarray:
    """This rank's samples for one epoch: a shuffle shared by the site, cut into equal shards.

    Every rank of a site gets the same number of samples (the remainder of the
    shuffle is dropped) so that all take the same number of steps: Horovod's
    allreduce would hang if one rank took a step the others did not.
    """
    if len(train) < site_size:
        raise ConfigError(f"site {site_index}: {len(train)} training samples for {site_size} ranks")
    rng = np.random.default_rng([seed, 17, site_index, round_, epoch])
    perm = rng.permutation(train)
    per_rank = len(train) // site_size
    return perm[rank_in_site * per_rank:(rank_in_site + 1) * per_rank]


def steps_per_epoch(n_train: int, site_size: int, batch_size: int) -> int:
    return max(1, -(-(n_train // site_size) // batch_size))


def partition_summary(cfg, ds: Dataset, names: Sequence[str]) -> dict:
    """Per-site sample and class counts, recorded in manifest.json."""
    parts = partition(ds.y, len(names), cfg.data.partition, cfg.run.seed, cfg.data.dirichlet_alpha)
    out = {}
    for i, (name, idx) in enumerate(zip(names, parts)):
        tr, va = train_val_split(idx, cfg.data.val_fraction, cfg.run.seed, i)
        out[name] = {
            "train": int(len(tr)), "val": int(len(va)),
            "classes": {int(c): int(k) for c, k in zip(*np.unique(ds.y[idx], return_counts=True))},
        }
    return {"dataset": cfg.data.name, "partition": cfg.data.partition, "sites": out}
