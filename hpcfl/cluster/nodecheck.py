"""Does the node agree with the config? Checked by each rank before it pins itself, and read from SLURM.

A ``cluster:`` section describing more cores or GPUs than the node has used to end in
``OSError: [Errno 22] Invalid argument`` from ``sched_setaffinity`` on one rank, naming no
setting. :func:`check_place` compares a rank's place with what this process can see
(:func:`node_facts`) and raises one line naming the cluster key that disagrees.

Where the config leaves the node shape out (none of ``cluster.sockets_per_node``,
``cores_per_socket``, ``gpus_per_node`` set), ``hpcfl render``/``submit`` read it
from ``scontrol show node`` (:func:`fill_node_shape`), say what they read, and fix it in the
rendered script with ``--set`` so that every rank of the job places itself the same way.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from .placement import DEFAULT_NODE, Place, node_shape

SHAPE_KEYS = ("sockets_per_node", "cores_per_socket", "gpus_per_node")


class NodeMismatch(ConfigError):
    """The node a rank runs on cannot give the place the config's cluster section asks for."""


@dataclass(frozen=True)
class NodeFacts:
    """What one process sees of its node."""
    host: str
    cpus: Tuple[int, ...]  # the CPUs this process may use (sched_getaffinity)
    node_cpus: int  # CPUs of the node (os.cpu_count)
    gpus: int  # GPUs this process can see
    gpus_bound: bool = False  # CUDA_VISIBLE_DEVICES was set (by the launcher): ``gpus`` is its share, not the node's


def count_gpus(env: Optional[Dict[str, str]] = None, proc: Path = Path("/proc/driver/nvidia/gpus"),
               dev: Path = Path("/dev")) -> Tuple[int, bool]:
    """(GPUs this process can see, whether CUDA_VISIBLE_DEVICES decides it), without importing torch or CUDA."""
    env = os.environ if env is None else env
    vis = env.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len(_visible_ids(vis)), True
    try:
        return len([p for p in proc.iterdir() if p.is_dir()]), False
    except OSError:
        pass
    try:
        return len([p for p in dev.iterdir() if re.fullmatch(r"nvidia\d+", p.name)]), False
    except OSError:
        return 0, False


def visible_device_for(vis: Optional[str], gpu: int, rank: int) -> Optional[str]:
    """The CUDA_VISIBLE_DEVICES a rank placed on the node's GPU ``gpu`` must run with, or None to keep ``vis``.

    Unset: that GPU alone. One id: the launcher bound the rank already. Several (``srun --gpus-per-node`` with
    ``--gpu-bind=none`` lists every GPU of the job's share of the node to every task): the placement's entry of
    that list, so the rank trains on the GPU next to the cores it was pinned to (not the rank's round-robin
    pick). Set and empty: left alone (check_place names it)."""
    if vis is None:
        return str(gpu)
    ids = _visible_ids(vis)
    if len(ids) <= 1:
        return None
    if gpu >= len(ids):
        raise NodeMismatch(f"cluster: rank {rank} was placed on GPU {gpu} but CUDA_VISIBLE_DEVICES lists only "
                           f"{len(ids)} GPUs ({vis}); check cluster.gpus_per_node")
    return ids[gpu]


def _visible_ids(vis: str) -> List[str]:
    """The usable ids of a CUDA_VISIBLE_DEVICES value: CUDA stops at the first invalid one ("-1", "NoDevFiles")."""
    usable = []
    for x in (x.strip() for x in vis.split(",") if x.strip()):
        if x.startswith("-") or x == "NoDevFiles":
            break
        usable.append(x)
    return usable


def node_facts() -> NodeFacts:
    gpus, bound = count_gpus()
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    return NodeFacts(socket.gethostname(), cpus, max(os.cpu_count() or len(cpus), len(cpus)), gpus, bound)


def _span(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ",".join(map(str, ids))


def _is(cluster, key: str, value: int) -> str:
    left_out = getattr(cluster, key) is None
    return f"cluster.{key} is {value}" + (" (the default: the config leaves it out)" if left_out else "")


def check_place(cluster, place: Place, facts: NodeFacts) -> None:
    """Raise NodeMismatch, in one line naming the cluster key, if this node cannot give ``place``.

    ``cluster`` is the config's cluster section. Checked: the node has the cores the section
    describes; the place's cores are CPUs this process may use (unless the launcher bound it
    to fewer CPUs than the node has: then the launcher's binding stands and nothing is pinned);
    the node shows the GPUs the section describes (or, when the launcher chose the visible
    GPUs, at least one for a rank placed on a GPU).
    """
    shape = node_shape(cluster)
    S, C = shape.sockets_per_node, shape.cores_per_socket
    on = f"rank {place.rank} was placed on cores {_span(place.cores)}" if place.cores else ""
    if S * C > facts.node_cpus:
        if S > facts.node_cpus:
            what = _is(cluster, "sockets_per_node", S)
        elif S == 1:
            what = _is(cluster, "cores_per_socket", C)
        else:
            what = _is(cluster, "cores_per_socket", C) + f" (x {S} sockets_per_node = {S * C} cores)"
        raise NodeMismatch(f"{what} but node {facts.host} has {facts.node_cpus} CPUs" + (f" ({on})" if on else ""))
    launcher_bound = len(facts.cpus) < facts.node_cpus
    if place.cores and not launcher_bound and not set(place.cores) <= set(facts.cpus):
        raise NodeMismatch(f"cluster: {on} but this process may use only CPUs {_span(facts.cpus)} of node "
                           f"{facts.host}; check cluster.sockets_per_node and cluster.cores_per_socket")
    G = shape.gpus_per_node
    if facts.gpus_bound:
        if place.gpu is not None and facts.gpus < 1:
            raise NodeMismatch(f"{_is(cluster, 'gpus_per_node', G)} but rank {place.rank} on node {facts.host} "
                               "sees no GPU (CUDA_VISIBLE_DEVICES is set and empty)")
        return
    if G > facts.gpus:
        gpu = f" (rank {place.rank} was placed on GPU {place.gpu})" if place.gpu is not None else ""
        shows = f"{facts.gpus} GPU{'s' if facts.gpus != 1 else ''}" if facts.gpus else "no GPU"
        raise NodeMismatch(f"{_is(cluster, 'gpus_per_node', G)} but node {facts.host} shows {shows}{gpu}")


# -- the node shape from SLURM ---------------------------------------------------------

_FIELD = re.compile(r"(\w+)=(\S*)")


def parse_gres_gpus(gres: str) -> int:
    """GPUs in a Gres string: ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``gpu:v100:2,mps:200``; 0 for ``(null)``."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        item = item.split("(")[0]
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_scontrol_nodes(text: str) -> List[Dict[str, str]]:
    """``scontrol --oneliner show node`` output: one dict of fields per node."""
    nodes = []
    for line in text.splitlines():
        fields = dict(_FIELD.findall(line))
        if "NodeName" in fields:
            nodes.append(fields)
    return nodes


def shape_of_nodes(nodes: Sequence[Dict[str, str]], partition: str = "") -> Tuple[Optional[Tuple[int, int, int]], str]:
    """((sockets, cores per socket, GPUs), what was read) over the partition's nodes; the smallest where they differ."""
    if partition:
        nodes = [n for n in nodes if partition in n.get("Partitions", "").split(",")]
    shapes = []
    for n in nodes:
        try:
            sockets = int(n["Sockets"]) * int(n.get("Boards", "1") or 1)
            cores = int(n["CoresPerSocket"])
        except (KeyError, ValueError):
            continue
        if sockets >= 1 and cores >= 1:
            shapes.append((sockets, cores, parse_gres_gpus(n.get("Gres", ""))))
    where = f"partition {partition}" if partition else "all partitions"
    if not shapes:
        return None, f"no node{' of ' + where if partition else ''} with a readable shape"
    counts = Counter(shapes)
    if len(counts) == 1:
        return shapes[0], f"{len(shapes)} node(s) of {where}"
    smallest = tuple(min(s[i] for s in shapes) for i in range(3))
    return smallest, f"{len(shapes)} nodes of {where}, of {len(counts)} shapes: the smallest of each"  # type: ignore[return-value]


Runner = Callable[[List[str]], Tuple[int, str, str]]


def _run(argv: List[str]) -> Tuple[int, str, str]:
    """A SLURM query within its deadline (ControllerUnreachable when SLURM does not answer)."""
    from .slurmcmd import call

    r = call(argv)
    return r.returncode, r.stdout, r.stderr


def _describe(shape: Tuple[int, int, int]) -> str:
    s, c, g = shape
    return f"{s} socket{'s' if s != 1 else ''} x {c} cores, " + (f"{g} GPU{'s' if g != 1 else ''}" if g else "no GPU")


def read_nodes(run: Runner = _run, which=shutil.which) -> Tuple[Optional[List[Dict[str, str]]], str]:
    """(the nodes ``scontrol --oneliner show node`` lists, or None; why not). ControllerUnreachable propagates."""
    if which("scontrol") is None:
        return None, "there is no SLURM here (scontrol not found)"
    rc, out, err = run(["scontrol", "--oneliner", "show", "node"])
    if rc != 0:
        return None, "scontrol show node: " + (((err or out).strip().splitlines() or [f"exit code {rc}"])[-1])
    return parse_scontrol_nodes(out), ""


def fill_node_shape(cfg, overrides: Sequence[str] = (), run: Runner = _run, which=shutil.which,
                    nodes: Optional[Tuple[Optional[List[Dict[str, str]]], str]] = None):
    """(cfg, overrides, line): the node shape read from ``scontrol show node`` when the config leaves it out.

    "Left out" means that none of cluster.sockets_per_node, cores_per_socket and gpus_per_node
    is set (absent or null): a config that sets any of them describes the node itself, and the
    keys it leaves out take DEFAULT_NODE. The values read are added to ``overrides`` as ``--set
    cluster.KEY=N`` (so the rendered script's ranks place themselves on the same shape), and
    ``line`` says what was read and from where; without SLURM (or with its controller down) the
    defaults stand and ``line`` says so. ``line`` is '' when the config describes the node.
    ``nodes``: what :func:`read_nodes` returned, when the caller has read them already."""
    from .slurmcmd import ControllerUnreachable

    c = cfg.cluster
    missing = [k for k in SHAPE_KEYS if getattr(c, k) is None]
    if len(missing) < len(SHAPE_KEYS):  # the config describes the node: keys it leaves out take DEFAULT_NODE
        return cfg, list(overrides), ""
    defaults = ", ".join(f"{k}={v}" for k, v in zip(SHAPE_KEYS, DEFAULT_NODE) if k in missing)
    hint = "set cluster.sockets_per_node, cores_per_socket and gpus_per_node to describe the nodes"
    if nodes is None:
        try:
            nodes = read_nodes(run, which)
        except ControllerUnreachable as exc:
            nodes = None, str(exc)
    listed, why = nodes
    if listed is None and which("scontrol") is None:
        return cfg, list(overrides), f"cluster: the node shape is left out and {why}: using {defaults}; {hint}"
    shape, what = shape_of_nodes(listed, c.partition) if listed is not None else (None, why)
    if shape is None:
        why = what if listed is not None else why
        why = why if why.startswith("scontrol") else f"scontrol show node: {why}"
        return cfg, list(overrides), f"cluster: the node shape is left out and SLURM could not tell it " \
                                     f"({why}): using {defaults}; {hint}"
    values = {k: v for k, v in zip(SHAPE_KEYS, shape) if k in missing}
    new = dataclasses.replace(cfg, cluster=dataclasses.replace(c, **values))
    sets = [f"cluster.{k}={v}" for k, v in values.items()]
    line = f"cluster: node shape from SLURM (scontrol show node, {what}): {_describe(shape)}; " \
           f"the script sets {' '.join(sets)}"
    return new, [*overrides, *sets], line


# -- does the job fit the partition's nodes? (hpcfl submit) ----------------------------------------------


def mem_mb(text: str) -> int:
    """``--mem`` as SLURM reads it, in MiB: 4000, 4000M, 120G, 1T; 0 = the whole node."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)B?\s*", text or "", re.I)
    if not m:
        raise ConfigError(f"cluster.mem_per_node: {text!r} is not a memory size (e.g. 4000M, 120G)")
    n, unit = int(m.group(1)), m.group(2).upper() or "M"
    return {"K": n // 1024, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]


def _node_row(n: Dict[str, str]) -> Optional[Dict[str, int]]:
    try:
        sockets = int(n["Sockets"]) * int(n.get("Boards", "1") or 1)
        return {"cpus": int(n.get("CPUTot") or sockets * int(n["CoresPerSocket"]) * int(n.get("ThreadsPerCore", "1"))),
                "sockets": sockets, "cores": int(n["CoresPerSocket"]), "gpus": parse_gres_gpus(n.get("Gres", "")),
                "mem": int(n.get("RealMemory") or 0)}
    except (KeyError, ValueError):
        return None


def check_fit(cfg, nodes: Sequence[Dict[str, str]]) -> None:
    """Raise NodeMismatch, in one line naming the cluster key and both values, when fewer than
    ``cluster.nodes`` nodes of the partition (``scontrol show node``) have the CPUs, GPUs and memory
    the cluster section asks for: found by mpirun inside the job otherwise, in words that name no key
    (``ORTE_ERROR_LOG: Not found in file rmaps_rank_file.c``)."""
    c = cfg.cluster
    where = f"partition {c.partition}" if c.partition else "the cluster"
    if c.partition:
        nodes = [n for n in nodes if c.partition in n.get("Partitions", "").split(",")]
        if not nodes:
            raise NodeMismatch(f"cluster.partition is {c.partition!r} but SLURM has no node in it (scontrol show node)")
    rows = [r for r in map(_node_row, nodes) if r is not None]
    if not rows:
        return  # nothing readable: SLURM itself will judge the request
    shape = node_shape(c)
    S, C, G = shape.sockets_per_node, shape.cores_per_socket, shape.gpus_per_node
    mem = mem_mb(c.mem_per_node) if c.mem_per_node else 0
    cores = _is(c, "sockets_per_node", S) if S > max(r["cpus"] for r in rows) else \
        _is(c, "cores_per_socket", C) + (f" (x {S} sockets_per_node = {S * C} cores)" if S > 1 else "")
    tests = [("cpus", S * C, cores, "CPUs"), ("gpus", G, _is(c, "gpus_per_node", G), "GPUs"),
             ("mem", mem, f"cluster.mem_per_node is {c.mem_per_node} ({mem} MiB)", "MiB of RealMemory")]
    for key, need, what, unit in tests:
        best = max(r[key] for r in rows)
        if need > best:
            raise NodeMismatch(f"{what} but the nodes of {where} have at most {best} {unit} (scontrol show node)")
    fit = [r for r in rows if r["cpus"] >= S * C and r["gpus"] >= G and r["mem"] >= mem]
    if len(fit) < c.nodes:
        raise NodeMismatch(f"cluster.nodes is {c.nodes} but {where} has {len(fit)} node(s) with {S * C} CPUs"
                           + (f", {G} GPUs" if G else "") + (f", {mem} MiB" if mem else "") + f" (of {len(rows)})")


def check_node(cluster, facts: NodeFacts) -> None:
    """The node a job's placement step runs on, against the cluster section (CPUs, visible GPUs): the
    job ends with this line before srun/mpirun start ranks that the node cannot place."""
    check_place(cluster, Place(rank=0, node=0, socket=0, cores=()), facts)


__all__ = ["NodeFacts", "NodeMismatch", "check_place", "check_node", "check_fit", "read_nodes", "mem_mb", "node_facts",
           "count_gpus", "visible_device_for", "fill_node_shape",
           "parse_scontrol_nodes", "parse_gres_gpus", "shape_of_nodes"]
