"""`sites: {count: N, ranks: R}` kept as a count: site i is made when it is asked for, never stored.

Why: rank 0 of a 10,000-site federation with a cohort of 50 must cost what the cohort costs. Expanding
the shorthand into N SiteConfig objects (then N topology Sites, N names, N-entry manifests) made rank
0's memory grow with the sites that exist (docs/benchmarks.md, "Cross-device scale"). These sequences
answer len, indexing, iteration, ``index`` and ``in`` in O(1) memory; a site's settings are the same as
the expanded list's (``tests/unit/test_sitelist.py`` compares them).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Dict, Iterator, Union

_NAME = re.compile(r"^site([1-9][0-9]*)$")


class SiteNames(Sequence):
    """The names site1..siteN, computed on demand."""

    __slots__ = ("count",)

    def __init__(self, count: int):
        self.count = int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: Union[int, slice]) -> Any:
        if isinstance(i, slice):
            return [f"site{j + 1}" for j in range(*i.indices(self.count))]
        j = _index(i, self.count)
        return f"site{j + 1}"

    def __iter__(self) -> Iterator[str]:
        return (f"site{j + 1}" for j in range(self.count))

    def index(self, name: Any, *_: Any) -> int:  # type: ignore[override]
        m = _NAME.match(name) if isinstance(name, str) else None
        if m is None or int(m.group(1)) > self.count:
            raise ValueError(f"{name!r} is not one of site1..site{self.count}")
        return int(m.group(1)) - 1

    def __contains__(self, name: object) -> bool:
        try:
            self.index(name)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SiteNames):
            return other.count == self.count
        return isinstance(other, Sequence) and not isinstance(other, str) and len(other) == self.count \
            and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(("SiteNames", self.count))

    def __repr__(self) -> str:
        return f"SiteNames(site1..site{self.count})"

    def __reduce__(self):
        return (SiteNames, (self.count,))


class UniformSites(Sequence):
    """``count`` sites named site1..siteN of ``ranks`` ranks each and no per-site settings: the config's
    ``sites: {count, ranks}``. Items are ``hpcfl.config.SiteConfig``, made on demand."""

    __slots__ = ("count", "ranks")

    def __init__(self, count: int, ranks: int):
        self.count, self.ranks = int(count), int(ranks)

    @property
    def names(self) -> SiteNames:
        return SiteNames(self.count)

    def as_dict(self) -> Dict[str, int]:
        return {"count": self.count, "ranks": self.ranks}

    def _site(self, j: int) -> Any:
        from .config import SiteConfig  # config imports this module

        return SiteConfig(name=f"site{j + 1}", ranks=self.ranks)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: Union[int, slice]) -> Any:
        if isinstance(i, slice):
            return tuple(self._site(j) for j in range(*i.indices(self.count)))
        return self._site(_index(i, self.count))

    def __iter__(self) -> Iterator[Any]:
        return (self._site(j) for j in range(self.count))

    def index(self, site: Any, *_: Any) -> int:  # type: ignore[override]
        j = SiteNames(self.count).index(getattr(site, "name", None))
        if self._site(j) != site:
            raise ValueError(f"{site!r} is not in {self!r}")
        return j

    def __contains__(self, site: object) -> bool:
        try:
            self.index(site)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UniformSites):
            return (other.count, other.ranks) == (self.count, self.ranks)
        return isinstance(other, Sequence) and not isinstance(other, str) and len(other) == self.count \
            and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(("UniformSites", self.count, self.ranks))

    def __repr__(self) -> str:
        return f"UniformSites(count={self.count}, ranks={self.ranks})"

    def __reduce__(self):
        return (UniformSites, (self.count, self.ranks))


def _index(i: Any, n: int) -> int:
    j = int(i.__index__())
    if j < 0:
        j += n
    if not 0 <= j < n:
        raise IndexError(f"site index {i} is out of range ({n} sites)")
    return j


def names_of(sites: Sequence) -> Sequence[str]:
    """Site names of a config's sites: lazy for the shorthand, a list otherwise."""
    return sites.names if isinstance(sites, UniformSites) else [s.name for s in sites]


def rank_counts(sites: Sequence) -> set:
    """The distinct rank counts of a config's sites."""
    return {sites.ranks} if isinstance(sites, UniformSites) else {s.ranks for s in sites}


def total_ranks(sites: Sequence) -> int:
    return sites.count * sites.ranks if isinstance(sites, UniformSites) else sum(s.ranks for s in sites)
