"""Who does what: the pure mapping from (world size, sites, slots) to each rank's role.

Rank 0 is the aggregator. The K sites of the config are simulated by S *slots*:
a slot is a contiguous block of ranks (one process set) that trains, each round,
the sites assigned to it one after another, every one from the same global
weights. With S = K every site has its own ranks; with S < K a 2-core machine
simulates 128 sites. A slot only simulates sites of its own rank count.

    S = K:  rank   0      1   2      3   4
            role   agg    a0* a1     b0* b1         (* = slot leader)
    S = 1:  rank   0      1   2
            role   agg    [a, b]0* [a, b]1          slot 0 trains a, then b

    fed:   rank 0 + slot leaders (mpi4py);  slot:  a slot's ranks (Horovod process set / torch group)

Nothing here touches MPI, so the mapping (and the communicator colours derived
from it) is tested without it. Randomness that depends on a rank is seeded from
a site's *virtual* ranks (the world ranks it would have with S = K), so a
federation gives the same result whatever number of slots simulates it.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import TopologyError

AGGREGATOR = "aggregator"
SITE = "site"


@dataclass(frozen=True)
class Site:
    index: int
    name: str
    size: int  # ranks that train it together (the config's sites[i].ranks)
    slot: int  # index of the slot that simulates it
    first_rank: int  # its first virtual rank: the world rank it would lead with one slot per site

    def virtual_rank(self, rank_in_slot: int) -> int:
        """The world rank that would play ``rank_in_slot`` of this site with one slot per site (for seeding)."""
        return self.first_rank + rank_in_slot


@dataclass(frozen=True)
class Slot:
    index: int
    ranks: Tuple[int, ...]  # world ranks, contiguous, first one leads
    sites: Sequence[int]  # indices of the sites it simulates, in order (a range for {count, ranks})

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
    slot: Optional[Slot] = None
    rank_in_slot: Optional[int] = None
    names: Tuple[str, ...] = ()  # names of the slot's sites

    @property
    def is_aggregator(self) -> bool:
        return self.kind == AGGREGATOR

    @property
    def is_leader(self) -> bool:
        return self.kind == SITE and self.rank_in_slot == 0

    @property
    def in_federation_comm(self) -> bool:
        """Rank 0 and the slot leaders exchange models over MPI."""
        return self.is_aggregator or self.is_leader

    def describe(self) -> str:
        if self.is_aggregator:
            return f"rank {self.rank} (aggregator)"
        assert self.slot is not None
        if len(self.names) == 1:
            return f"rank {self.rank} (site {self.names[0]!r}, rank {self.rank_in_slot} of {self.slot.size} in site)"
        shown = ", ".join(repr(n) for n in self.names[:3]) + (f" +{len(self.names) - 3} more" if len(self.names) > 3 else "")
        return (f"rank {self.rank} (slot {self.slot.index}: sites {shown}, "
                f"rank {self.rank_in_slot} of {self.slot.size} in slot)")


class LazySites(SequenceABC):
    """The sites of ``sites: {count, ranks}`` on ``n`` slots, each made when asked for (``build_topology``
    with a ``hpcfl.sitelist.UniformSites``): rank 0 of 10,000 sites holds no Site per site. Slot j
    simulates the contiguous run ``starts[j]..starts[j+1]-1``, as ``assign_slots`` cuts one rank count."""

    def __init__(self, names: Sequence[str], size: int, starts: Sequence[int]):
        self.names, self.size, self.starts = names, int(size), tuple(starts)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        j = int(i.__index__()) + (len(self) if int(i.__index__()) < 0 else 0)
        if not 0 <= j < len(self):
            raise IndexError(f"site index {i} is out of range ({len(self)} sites)")
        return Site(index=j, name=self.names[j], size=self.size, slot=bisect.bisect_right(self.starts, j) - 1,
                    first_rank=1 + j * self.size)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceABC) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Topology:
    world_size: int
    sites: Sequence[Site]  # a tuple, or LazySites for the config's {count, ranks}
    slots: Tuple[Slot, ...]

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside this {self.world_size}-rank federation")
        if rank == 0:
            return Role(rank=0, kind=AGGREGATOR)
        for s in self.slots:
            if s.ranks[0] <= rank <= s.ranks[-1]:
                return Role(rank=rank, kind=SITE, slot=s, rank_in_slot=rank - s.ranks[0],
                            names=tuple(self.sites[i].name for i in s.sites))
        raise AssertionError("unreachable: slots cover the world")

    @property
    def leaders(self) -> Tuple[int, ...]:
        return tuple(s.leader for s in self.slots)

    @property
    def site_ranks(self) -> Tuple[int, ...]:
        """World ranks that train (everyone but the aggregator)."""
        return tuple(r for s in self.slots for r in s.ranks)

    @property
    def names(self) -> Sequence[str]:
        if isinstance(self.sites, LazySites):
            return self.sites.names
        return [s.name for s in self.sites]

    def slot_sites(self, slot: Slot) -> Tuple[Site, ...]:
        return tuple(self.sites[i] for i in slot.sites)

    def process_sets(self) -> Tuple[Tuple[int, ...], ...]:
        """Each slot's ranks numbered within the communicator of all slot ranks
        (world rank - 1): the aggregator never joins a site backend."""
        return tuple(tuple(r - 1 for r in s.ranks) for s in self.slots)

    horovod_process_sets = process_sets


LISTED_MAX = 64  # above this many sites, a manifest or rank record names the first and last only


def listed(names: Sequence[str], which: Optional[Sequence[int]] = None) -> Any:
    """Site names (of the sites ``which``, default all) for manifest.json and the per-rank records: a list up
    to LISTED_MAX, else {count, first, last} (a slot of 5,000 sites listed by every rank made rank 0's
    records grow with K)."""
    which = range(len(names)) if which is None else which
    if len(which) <= LISTED_MAX:
        return [names[i] for i in which]
    return {"count": len(which), "first": names[which[0]], "last": names[which[-1]]}


def expected_layout(sites: Sequence[Tuple[str, int]], slots: Optional[int] = None) -> str:
    parts = ", ".join(f"site {n!r} ({r})" for n, r in sites)
    if slots is None or slots == len(sites):
        return f"{1 + sum(r for _, r in sites)} ranks = 1 aggregator + {parts}"
    plan = assign_slots([r for _, r in sites], slots)
    ranks = sum(sizes_of(plan, [r for _, r in sites]))
    return f"{1 + ranks} ranks = 1 aggregator + {slots} slots simulating {len(sites)} sites"


# -- slots -------------------------------------------------------------------------------------------

def sites_by_rank_count(sizes: Sequence[int]) -> Dict[int, List[int]]:
    """Site indices by rank count, in order of first appearance."""
    out: Dict[int, List[int]] = {}
    for i, r in enumerate(sizes):
        out.setdefault(int(r), []).append(i)
    return out


def assign_slots(sizes: Sequence[int], n_slots: int) -> List[Tuple[int, ...]]:
    """Which sites each of ``n_slots`` slots simulates, given each site's rank count.

    Sites of different rank counts never share a slot. Every rank count gets at
    least one slot; the other slots go to rank counts in proportion to their
    number of sites (largest remainder); within a rank count, sites are cut into
    contiguous runs of near-equal length. Slots are ordered by their first site.
    """
    k = len(sizes)
    groups = sites_by_rank_count(sizes)
    if not 1 <= len(groups) <= n_slots <= k:
        raise TopologyError(f"launch.slots: {n_slots} slots cannot simulate {k} sites with "
                            f"{len(groups)} different rank count(s); choose between {len(groups)} and {k}")
    counts = {r: 1 for r in groups}
    spare = n_slots - len(groups)
    if spare:
        share = {r: spare * len(ix) / k for r, ix in groups.items()}
        extra = {r: min(int(share[r]), len(groups[r]) - 1) for r in groups}
        left = spare - sum(extra.values())
        order = sorted(groups, key=lambda r: (-(share[r] - int(share[r])), -len(groups[r])))
        while left:
            for r in order:
                if left and counts[r] + extra[r] < len(groups[r]):
                    extra[r] += 1
                    left -= 1
        counts = {r: 1 + extra[r] for r in groups}
    slots: List[Tuple[int, ...]] = []
    for r, ix in groups.items():
        slots.extend(tuple(int(i) for i in part) for part in np.array_split(np.asarray(ix), counts[r]))
    return sorted(slots, key=lambda s: s[0])


def sizes_of(plan: Sequence[Tuple[int, ...]], sizes: Sequence[int]) -> List[int]:
    return [int(sizes[s[0]]) for s in plan]


def world_size_for(sizes: Sequence[int], n_slots: int) -> int:
    return 1 + sum(sizes_of(assign_slots(sizes, n_slots), sizes))


def auto_slots(sizes: Sequence[int], capacity: int) -> int:
    """Default number of slots: one per site when ``capacity`` (cores or GPUs for site ranks) holds
    every site's ranks, else as many as fit (at least one per rank count)."""
    k = len(sizes)
    lo = len(sites_by_rank_count(sizes))
    if sum(sizes) <= capacity:
        return k
    best = lo
    for s in range(lo, k + 1):
        if world_size_for(sizes, s) - 1 <= capacity:
            best = s
        else:
            break
    return best


def slots_for_world(sizes: Sequence[int], world_size: int) -> int:
    """The number of slots a job of ``world_size`` ranks runs (world size grows strictly with slots)."""
    lo, k = len(sites_by_rank_count(sizes)), len(sizes)
    a, b = lo, k  # binary search: each try costs O(K), and 10,000 sites would make a linear scan O(K^2)
    while a <= b:
        s = (a + b) // 2
        n = world_size_for(sizes, s)
        if n == world_size:
            return s
        a, b = (s + 1, b) if n < world_size else (a, s - 1)
    fits = [world_size_for(sizes, s) for s in range(lo, min(k, lo + 5) + 1)]
    shown = ", ".join(map(str, fits)) + (f", ... {world_size_for(sizes, k)}" if k > lo + 5 else "")
    raise TopologyError(f"the job has {world_size} ranks, but the config's {k} sites run on {shown} ranks "
                        f"(1 aggregator + 1..{k} slots); launch with one of those (or use `hpcfl launch`, "
                        "which counts for you)")


def build_topology(world_size: int, sites: Sequence[Tuple[str, int]], slots: Optional[int] = None) -> Topology:
    """Map a world of ``world_size`` ranks onto ``sites`` given as (name, ranks) pairs.

    ``slots`` None: derived from the world size (one slot per site when it matches).
    Raises TopologyError, in one line saying what was expected, when they do not match.
    """
    if not sites:
        raise TopologyError("the config declares no sites")
    for name, n in sites:
        if n < 1:
            raise TopologyError(f"site {name!r} has {n} ranks; it needs at least 1")
    sizes = [int(r) for _, r in sites]
    if slots is None or slots <= 0:
        slots = slots_for_world(sizes, world_size)
    plan = assign_slots(sizes, slots)
    expected = 1 + sum(sizes_of(plan, sizes))
    if world_size != expected:
        raise TopologyError(
            f"the job has {world_size} ranks but the config needs {expected_layout(list(sites), slots)}; "
            f"launch with -n {expected} (or use `hpcfl launch`, which counts for you)"
        )
    slot_of = {i: si for si, p in enumerate(plan) for i in p}
    first = np.cumsum([1] + sizes[:-1])
    out_sites = tuple(Site(index=i, name=n, size=sizes[i], slot=slot_of[i], first_rank=int(first[i]))
                      for i, (n, _) in enumerate(sites))
    out_slots, nxt = [], 1
    for si, p in enumerate(plan):
        r = sizes[p[0]]
        out_slots.append(Slot(index=si, ranks=tuple(range(nxt, nxt + r)), sites=tuple(p)))
        nxt += r
    return Topology(world_size=world_size, sites=out_sites, slots=tuple(out_slots))


def build_uniform(world_size: int, names: Sequence[str], size: int, slots: Optional[int] = None) -> Topology:
    """``build_topology`` for sites of one rank count given by a lazy name sequence: the same sites and slots
    (contiguous runs, as np.array_split cuts them), in memory that does not grow with the number of sites."""
    k = len(names)
    if slots is None or slots <= 0:
        slots, extra = divmod(world_size - 1, size)
        if extra or not 1 <= slots <= k:
            slots_for_world([size] * k, world_size)  # raises its one-line error
    if not 1 <= slots <= k:
        raise TopologyError(f"launch.slots: {slots} slots cannot simulate {k} sites with 1 different rank count(s); "
                            f"choose between 1 and {k}")
    if world_size != 1 + slots * size:
        raise TopologyError(f"the job has {world_size} ranks but the config needs {1 + slots * size} ranks = "
                            f"1 aggregator + {slots} slots simulating {k} sites; launch with -n {1 + slots * size} "
                            "(or use `hpcfl launch`, which counts for you)")
    q, rem = divmod(k, slots)
    starts = [j * q + min(j, rem) for j in range(slots + 1)]
    out_slots = tuple(Slot(index=j, ranks=tuple(range(1 + j * size, 1 + (j + 1) * size)),
                           sites=range(starts[j], starts[j + 1])) for j in range(slots))
    return Topology(world_size=world_size, sites=LazySites(names, size, starts[:-1]), slots=out_slots)


def topology_for(cfg, world_size: Optional[int] = None, slots: Optional[int] = None) -> Topology:
    """Topology of a Config. ``slots`` defaults to ``launch.slots`` when set; the world size to what that needs
    (one slot per site when neither is given)."""
    if slots is None:
        configured = getattr(getattr(cfg, "launch", None), "slots", 0) or 0
        slots = configured if configured > 0 else None
    sites = cfg.sites
    if hasattr(sites, "names") and hasattr(sites, "ranks"):  # hpcfl.sitelist.UniformSites: kept lazy
        if world_size is None:
            world_size = 1 + (slots or len(sites)) * sites.ranks
        return build_uniform(world_size, sites.names, sites.ranks, slots)
    pairs = [(s.name, s.ranks) for s in sites]
    if world_size is None:
        world_size = world_size_for([r for _, r in pairs], slots or len(pairs))
    return build_topology(world_size, pairs, slots)


UNDEFINED = -1  # stands for MPI.UNDEFINED in the pure colour functions


def comm_colors(role: Role) -> dict:
    """Colours for ``COMM_WORLD.Split``: which communicators this rank joins.

    - ``federation``: rank 0 and slot leaders (colour 0), others UNDEFINED;
    - ``site``: one colour per slot (the ranks that train together), the aggregator UNDEFINED;
    - ``trainers``: every slot rank (colour 0), the communicator site backends start on.
    Keys are the world rank, so rank 0 stays root of the federation communicator
    and leaders keep slot rank 0.
    """
    return {
        "federation": 0 if role.in_federation_comm else UNDEFINED,
        "site": role.slot.index if role.slot is not None else UNDEFINED,
        "trainers": 0 if not role.is_aggregator else UNDEFINED,
    }


def balance(work: Sequence[float], n_slots: int) -> List[int]:
    """The slot of each of a round's sites, by estimated work (``launch.assign: balanced``).

    Greedy longest-processing-time first: sites in order of decreasing work (ties: lower index
    first) each go to the slot with the least work so far (ties: lower slot). Deterministic, so
    every rank computing it agrees; within 4/3 of the best makespan (Graham 1969).
    """
    if n_slots < 1:
        raise TopologyError(f"launch.assign: {n_slots} slots cannot train a round")
    load = [0.0] * n_slots
    out = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda j: (-float(work[j]), j)):
        s = min(range(n_slots), key=lambda j: (load[j], j))
        out[i] = s
        load[s] += float(work[i])
    return out
