"""In-memory datasets for the federation core, and how they are split.

Sites own disjoint parts of the data (:func:`partition`), each split into
train/validation (:func:`train_val_split`); inside a site every rank trains on
its own shard of a per-epoch shuffle (:func:`epoch_shard`). All of it is pure
and seeded, so every rank computes the same split without talking to others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

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
    if d.name == "arrays":
        return _arrays(d.path)
    raise ConfigError(f"data.name: unknown dataset {d.name!r}")


def _arrays(path: str) -> Dataset:
    """``data.path``/x.npy (float32, (N, ...)) and y.npy (integer labels 0..C-1), memory-mapped copy-on-write:
    every process that simulates sites maps the same pages, so a large set is held once per node."""
    from pathlib import Path

    root = Path(path)
    try:
        x = np.load(root / "x.npy", mmap_mode="c")
        y = np.asarray(np.load(root / "y.npy"), np.int64)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.path: {root}: cannot read x.npy and y.npy ({exc})") from None
    if x.dtype != np.float32 or x.ndim < 2 or y.shape != (len(x),):
        raise ConfigError(f"data.path: {root}: x.npy must be float32 (N, ...) and y.npy (N,) labels; got "
                          f"x {x.dtype} {x.shape}, y {y.shape}")
    if len(y) == 0 or y.min() < 0:
        raise ConfigError(f"data.path: {root}/y.npy: labels must be 0..C-1")
    return Dataset(x=x, y=y, num_classes=int(y.max()) + 1)


class Partition:
    """Which samples each site owns (disjoint, covering all samples), computed per site on demand.

    Sites are data, not objects: the plan is one permutation of the samples and
    a table of cut points (``iid``, ``quantity``: K + 1 offsets; ``dirichlet``:
    K + 1 per class), so 10,000 sites cost a few hundred KB and no per-site
    arrays until a site is asked for (``parts[i]``, its indices, sorted).

    ``iid``: a seeded permutation cut into near-equal parts. ``dirichlet``: for
    each class, site shares drawn from Dir(alpha) (label skew, as in the FL
    literature); redrawn until every site has ``min_per_site`` samples, and after
    ``REDRAWS`` draws (many sites, small alpha) the sites short of it take the
    samples they lack from the largest sites. ``quantity``: site sizes from
    Dir(alpha) over the sites on top of ``min_per_site`` each, labels IID.
    """

    REDRAWS = 1000

    def __init__(self, y: np.ndarray, n_sites: int, how: str, seed: int, alpha: float = 0.5,
                 min_per_site: int = 2):
        n = len(y)
        if n < n_sites * min_per_site:
            raise ConfigError(f"data: {n} samples cannot be split over {n_sites} sites")
        if how not in ("iid", "dirichlet", "quantity"):
            raise ConfigError(f"data.partition: unknown partition {how!r}")
        self.k, self.how = n_sites, how
        self.moved: dict = {}  # dirichlet top-up: site -> (indices taken away, indices added)
        rng = np.random.default_rng([seed, 11])
        if how == "iid":
            self.perm = [rng.permutation(n)]
            base, extra = divmod(n, n_sites)  # np.array_split's cut: the first `extra` parts one longer
            sizes = np.full(n_sites, base, np.int64)
            sizes[:extra] += 1
            self.bounds = [np.concatenate([[0], np.cumsum(sizes)])]
        elif how == "quantity":
            self.perm = [rng.permutation(n)]
            shares = rng.dirichlet(np.full(n_sites, alpha))
            spare = n - n_sites * min_per_site
            cuts = np.concatenate([[0], (np.cumsum(shares)[:-1] * spare).astype(np.int64), [spare]])
            self.bounds = [cuts + np.arange(n_sites + 1) * min_per_site]
        else:
            self._dirichlet(y, rng, alpha, min_per_site)

    def _dirichlet(self, y: np.ndarray, rng: np.random.Generator, alpha: float, min_per_site: int) -> None:
        classes = np.unique(y)
        for attempt in range(self.REDRAWS):
            self.perm, self.bounds = [], []
            for c in classes:
                idx = rng.permutation(np.flatnonzero(y == c))
                shares = rng.dirichlet(np.full(self.k, alpha))
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
                self.perm.append(idx)
                self.bounds.append(np.concatenate([[0], cuts, [len(idx)]]))
            sizes = self.sizes()
            if sizes.min() >= min_per_site:
                return
            if self.k > 64 and attempt >= 9:  # many sites: redraws would rarely help; top up instead
                break
        else:
            raise ConfigError(f"data.dirichlet_alpha: {alpha} leaves some of {self.k} sites without data; raise it")
        self._top_up(min_per_site)

    def _top_up(self, min_per_site: int) -> None:
        """Sites short of ``min_per_site`` samples take them from the largest sites (deterministic)."""
        sizes = self.sizes()
        for i in np.flatnonzero(sizes < min_per_site):
            while sizes[i] < min_per_site:
                donor = int(np.argmax(sizes))
                give = self._own(donor)[-1:]
                self.moved.setdefault(donor, ([], []))[0].extend(give.tolist())
                self.moved.setdefault(int(i), ([], []))[1].extend(give.tolist())
                sizes[donor] -= 1
                sizes[i] += 1

    def __len__(self) -> int:
        return self.k

    def sizes(self) -> np.ndarray:
        """Samples per site (K,), without building any site's indices."""
        out = np.sum([np.diff(b) for b in self.bounds], axis=0).astype(np.int64)
        for i, (gone, got) in self.moved.items():
            out[i] += len(got) - len(gone)
        return out

    def _own(self, i: int) -> np.ndarray:
        parts = [p[b[i]:b[i + 1]] for p, b in zip(self.perm, self.bounds)]
        own = np.sort(np.concatenate(parts).astype(np.int64))
        if i in self.moved:
            gone, got = self.moved[i]
            own = np.sort(np.concatenate([np.setdiff1d(own, gone), np.asarray(got, np.int64)]))
        return own

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.k:
            raise IndexError(i)
        return self._own(int(i))

    def __iter__(self):
        return (self[i] for i in range(self.k))


def partition(y: np.ndarray, n_sites: int, how: str, seed: int, alpha: float = 0.5,
              min_per_site: int = 2) -> Partition:
    """Indices of the samples each site owns: a lazy :class:`Partition` (index it, or iterate)."""
    return Partition(y, n_sites, how, seed, alpha, min_per_site)


def held_out(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(held-out, rest): ``eval.central_fraction`` of ``n`` samples, seeded, kept from every site (sorted)."""
    perm = np.random.default_rng([seed, 61]).permutation(n)
    m = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(perm[:m]), np.sort(perm[m:])


class Subset:
    """A partition of the samples ``rest`` (indices into the whole set), as :class:`Partition` answers."""

    def __init__(self, inner: Partition, rest: np.ndarray):
        self.inner, self.rest = inner, rest

    def __len__(self) -> int:
        return len(self.inner)

    def sizes(self) -> np.ndarray:
        return self.inner.sizes()

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rest[self.inner[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def site_partition(cfg, y: np.ndarray, n_sites: int):
    """The sites' partition: of every sample, or (eval.central_fraction > 0) of those the central
    held-out set leaves; without a held-out set it is exactly what it always was."""
    d, fraction = cfg.data, cfg.eval.central_fraction
    if not fraction:
        return partition(y, n_sites, d.partition, cfg.run.seed, d.dirichlet_alpha)
    _, rest = held_out(len(y), fraction, cfg.run.seed)
    return Subset(partition(y[rest], n_sites, d.partition, cfg.run.seed, d.dirichlet_alpha), rest)


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


SUMMARY_SITES = 256


def partition_summary(cfg, ds: Dataset, names: Sequence[str]) -> dict:
    """Per-site sample and class counts, recorded in manifest.json (above ``SUMMARY_SITES`` sites, the
    distribution of site sizes instead: a manifest of 10,000 entries helps nobody)."""
    parts = site_partition(cfg, ds.y, len(names))
    if len(names) > SUMMARY_SITES:
        sizes = parts.sizes()
        return {"dataset": cfg.data.name, "partition": cfg.data.partition, "sites_total": len(names),
                "samples_per_site": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                     "max": int(sizes.max()), "total": int(sizes.sum())}}
    out = {}
    for i, (name, idx) in enumerate(zip(names, parts)):
        tr, va = train_val_split(idx, cfg.data.val_fraction, cfg.run.seed, i)
        out[name] = {
            "train": int(len(tr)), "val": int(len(va)),
            "classes": {int(c): int(k) for c, k in zip(*np.unique(ds.y[idx], return_counts=True))},
        }
    return {"dataset": cfg.data.name, "partition": cfg.data.partition, "sites": out}
