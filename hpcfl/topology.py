"""Who does what: the pure mapping from (world size, sites) to each rank's role.

Rank 0 is the aggregator. Sites follow in config order, each a contiguous block
of ranks whose first rank is the site leader. Nothing here touches MPI, so the
mapping (and the communicator colours derived from it) is tested without it.

    rank:   0        1   2        3   4
    role:   agg      a0* a1       b0* b1        (* = site leader)
    fed:    x        x            x             rank 0 + leaders  (mpi4py)
    site a:          x   x                      Horovod process set / site comm
    site b:                       x   x
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .errors import TopologyError

AGGREGATOR = "aggregator"
SITE = "site"


@dataclass(frozen=True)
class Site:
    index: int
    name: str
    ranks: Tuple[int, ...]  # world ranks, contiguous, first one leads

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Role:
    rank: int
    kind: str  # AGGREGATOR or SITE
    site: Optional[Site] = None
    rank_in_site: Optional[int] = None

    @property
    def is_aggregator(self) -> bool:
        return self.kind == AGGREGATOR

    @property
    def is_leader(self) -> bool:
        return self.kind == SITE and self.rank_in_site == 0

    @property
    def in_federation_comm(self) -> bool:
        """Rank 0 and the site leaders exchange models over MPI."""
        return self.is_aggregator or self.is_leader

    def describe(self) -> str:
        if self.is_aggregator:
            return f"rank {self.rank} (aggregator)"
        assert self.site is not None
        return f"rank {self.rank} (site {self.site.name!r}, rank {self.rank_in_site} of {self.site.size} in site)"


@dataclass(frozen=True)
class Topology:
    world_size: int
    sites: Tuple[Site, ...]

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside this {self.world_size}-rank federation")
        if rank == 0:
            return Role(rank=0, kind=AGGREGATOR)
        for s in self.sites:
            if s.ranks[0] <= rank <= s.ranks[-1]:
                return Role(rank=rank, kind=SITE, site=s, rank_in_site=rank - s.ranks[0])
        raise AssertionError("unreachable: ranks cover the world")

    @property
    def leaders(self) -> Tuple[int, ...]:
        return tuple(s.leader for s in self.sites)

    @property
    def site_ranks(self) -> Tuple[int, ...]:
        """World ranks that train (everyone but the aggregator)."""
        return tuple(r for s in self.sites for r in s.ranks)

    def site_by_name(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def horovod_process_sets(self) -> Tuple[Tuple[int, ...], ...]:
        """Each site's ranks numbered within the communicator Horovod is initialised on
        (all site ranks, i.e. world rank - 1): the aggregator never runs Horovod."""
        return tuple(tuple(r - 1 for r in s.ranks) for s in self.sites)


def expected_layout(sites: Sequence[Tuple[str, int]]) -> str:
    parts = ", ".join(f"site {n!r} ({r})" for n, r in sites)
    return f"{1 + sum(r for _, r in sites)} ranks = 1 aggregator + {parts}"


def build_topology(world_size: int, sites: Sequence[Tuple[str, int]]) -> Topology:
    """Map a world of ``world_size`` ranks onto ``sites`` given as (name, ranks) pairs.

    Raises TopologyError, in one line saying what was expected, when they do not match.
    """
    if not sites:
        raise TopologyError("the config declares no sites")
    expected = 1 + sum(r for _, r in sites)
    if world_size != expected:
        raise TopologyError(
            f"the job has {world_size} ranks but the config needs {expected_layout(sites)}; "
            f"launch with -n {expected} (or use `hpcfl launch`, which counts for you)"
        )
    out = []
    nxt = 1
    for i, (name, n) in enumerate(sites):
        if n < 1:
            raise TopologyError(f"site {name!r} has {n} ranks; it needs at least 1")
        out.append(Site(index=i, name=name, ranks=tuple(range(nxt, nxt + n))))
        nxt += n
    return Topology(world_size=world_size, sites=tuple(out))


def topology_for(cfg, world_size: Optional[int] = None) -> Topology:
    """Topology of a Config (world size defaults to what the config needs)."""
    pairs = [(s.name, s.ranks) for s in cfg.sites]
    return build_topology(cfg.world_size if world_size is None else world_size, pairs)


UNDEFINED = -1  # stands for MPI.UNDEFINED in the pure colour functions


def comm_colors(role: Role) -> dict:
    """Colours for ``COMM_WORLD.Split``: which communicators this rank joins.

    - ``federation``: rank 0 and site leaders (colour 0), others UNDEFINED;
    - ``site``: one colour per site, the aggregator UNDEFINED;
    - ``trainers``: every site rank (colour 0), the communicator Horovod runs on.
    Keys are the world rank, so rank 0 stays root of the federation communicator
    and leaders keep site rank 0.
    """
    return {
        "federation": 0 if role.in_federation_comm else UNDEFINED,
        "site": role.site.index if role.site is not None else UNDEFINED,
        "trainers": 0 if not role.is_aggregator else UNDEFINED,
    }
