"""Where every rank goes: a pure function of the machine shape and the sites.

The hardware is cut into *slots*: one per GPU on GPU nodes, otherwise one per
socket (Intel's one-rank-per-socket pinning, ``--map-by ppr:1:socket:pe=N``), or
``cores_per_rank`` cores each when that is set. The aggregator needs little: a
few cores on the first node (or a node of its own), no GPU. A site's ranks are
kept on one node whenever they fit on one, so its Horovod allreduce stays
inside the node; sites larger than a node span consecutive nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..errors import ConfigError


# (sockets_per_node, cores_per_socket, gpus_per_node) of a node whose shape the config leaves
# out and no SLURM could describe (render/submit read it from `scontrol show node` where they can).
DEFAULT_NODE = (2, 16, 0)


@dataclass(frozen=True)
class Shape:
    nodes: int
    sockets_per_node: int
    cores_per_socket: int
    gpus_per_node: int = 0


@dataclass(frozen=True)
class Place:
    rank: int
    node: int
    socket: int
    cores: Tuple[int, ...]  # core ids within the node
    gpu: Optional[int] = None  # GPU index within the node


def node_shape(cluster) -> Shape:
    """The Shape a config's cluster section describes: node-shape keys left out (None) take DEFAULT_NODE."""
    got = (cluster.sockets_per_node, cluster.cores_per_socket, cluster.gpus_per_node)
    s, c, g = (d if v is None else v for v, d in zip(got, DEFAULT_NODE))
    return Shape(cluster.nodes, s, c, g)


def _slots(shape: Shape, node: int, reserved: int, cores_per_rank: int,
           ranks_per_gpu: int = 1) -> List[Tuple[int, Tuple[int, ...], Optional[int]]]:
    """(socket, cores, gpu) slots of one node, after ``reserved`` cores of socket 0 went to the aggregator;
    ``ranks_per_gpu`` consecutive slots share each GPU and split its cores."""
    out = []
    cps, S = shape.cores_per_socket, shape.sockets_per_node
    free = {s: list(range(s * cps + (reserved if s == 0 else 0), (s + 1) * cps)) for s in range(S)}
    if shape.gpus_per_node:
        g_per_s = max(1, shape.gpus_per_node // S)
        for g in range(shape.gpus_per_node):
            s = min(g // g_per_s, S - 1)
            share = (cores_per_rank * ranks_per_gpu if cores_per_rank
                     else max(ranks_per_gpu, (cps - (reserved if s == 0 else 0)) // g_per_s))
            take, free[s] = free[s][:share], free[s][share:]
            if len(take) < ranks_per_gpu:
                raise ConfigError(f"cluster: node {node} socket {s} has no core left for GPU {g}" if not take else
                                  f"cluster: node {node} socket {s} has {len(take)} core(s) left for GPU {g}, whose "
                                  f"cluster.ranks_per_gpu {ranks_per_gpu} ranks need one each")
            each = len(take) // ranks_per_gpu
            out += [(s, tuple(take[i * each:(i + 1) * each]), g) for i in range(ranks_per_gpu)]
        return out
    for s in range(S):
        cores = free[s]
        if cores_per_rank:
            out += [(s, tuple(cores[i:i + cores_per_rank]), None)
                    for i in range(0, len(cores) - cores_per_rank + 1, cores_per_rank)]
        elif cores:
            out.append((s, tuple(cores), None))
    return out


def place(shape: Shape, sites: Sequence[Tuple[str, int]], aggregator_cores: int = 1,
          aggregator_own_node: bool = False, cores_per_rank: int = 0, oversubscribe: bool = False,
          ranks_per_gpu: int = 1) -> List[Place]:
    """One Place per world rank (rank 0 = aggregator, then the sites' ranks in order).

    Raises ConfigError, in one line, when the ranks cannot fit, unless
    ``oversubscribe`` (a workstation): then ranks share slots round-robin.
    An aggregator with 0 cores is not pinned (empty ``cores``).
    """
    if aggregator_cores > shape.cores_per_socket:
        raise ConfigError(f"cluster.aggregator_cores: {aggregator_cores} is more than a socket's "
                          f"{shape.cores_per_socket} cores")
    agg = Place(rank=0, node=0, socket=0, cores=tuple(range(aggregator_cores)))
    first = 1 if aggregator_own_node else 0
    if first >= shape.nodes:
        raise ConfigError("cluster.aggregator_own_node: needs at least 2 nodes")
    nodes = [_slots(shape, n, aggregator_cores if n == 0 else 0, cores_per_rank, ranks_per_gpu)
             for n in range(first, shape.nodes)]
    total = sum(len(s) for s in nodes)
    need = sum(r for _, r in sites)
    kind = ("slot of " + (f"{cores_per_rank} cores" if cores_per_rank else "one socket")
            if not shape.gpus_per_node else "GPU" if ranks_per_gpu == 1 else f"1/{ranks_per_gpu} GPU")
    if need > total and oversubscribe:
        flat = [(i, slot) for i, slots in enumerate(nodes) for slot in slots]
        out = [agg]
        for k in range(need):
            i, (s, cores, gpu) = flat[k % len(flat)]
            out.append(Place(rank=k + 1, node=i + first, socket=s, cores=cores, gpu=gpu))
        return out
    if need > total:
        raise ConfigError(f"cluster: the sites need {need} ranks but {shape.nodes - first} node(s) give {total} "
                          f"(one rank per {kind}); add nodes or lower sites[].ranks")
    out, rank = [agg], 1
    used = [0] * len(nodes)
    for name, r in sites:
        # Keep the site on one node when some node still has room for all of it;
        # otherwise spread it over the free slots, first nodes first.
        n = next((i for i in range(len(nodes)) if len(nodes[i]) - used[i] >= r), None)
        if n is None:
            n = next(i for i in range(len(nodes)) if used[i] < len(nodes[i]))
        for _ in range(r):
            while used[n] >= len(nodes[n]):
                n += 1
            s, cores, gpu = nodes[n][used[n]]
            used[n] += 1
            out.append(Place(rank=rank, node=n + first, socket=s, cores=cores, gpu=gpu))
            rank += 1
    return out


def ranks_per_node(places: Sequence[Place], nodes: int) -> List[int]:
    counts = [0] * nodes
    for p in places:
        counts[p.node] += 1
    return counts
