"""sbatch scripts, rendered by a pure function of the config (and tested against golden files).

The script asks SLURM for whole nodes, writes the placement of every rank at
job start (``hpcfl placement``: a hostfile for srun's arbitrary distribution, a
rankfile for mpirun), and starts ``hpcfl run`` on every rank. Ranks pin
themselves to the cores and GPU of their place when the launcher did not
(``hpcfl run --pin cluster``), and record what they got in manifest.json. When the cluster
section has fewer places than the sites have ranks, slots simulate several sites each
(:func:`cluster_slots`; ``launch.slots`` chooses).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..config import Config
from ..topology import expected_layout
from .placement import Shape, node_shape, place, ranks_per_node


def cluster_shape(cfg: Config) -> Shape:
    """The job's nodes; node-shape keys left out (null) take DEFAULT_NODE (render/submit fill them from SLURM first)."""
    return node_shape(cfg.cluster)


def slot_groups(cfg: Config, slots: int) -> List[Tuple[str, int]]:
    """(name, ranks) of the process groups of ``slots`` slots: what placement keeps on one node."""
    from ..topology import assign_slots

    sizes = [s.ranks for s in cfg.sites]
    if slots == len(sizes):
        return [(s.name, s.ranks) for s in cfg.sites]
    return [(f"slot{i}", sizes[p[0]]) for i, p in enumerate(assign_slots(sizes, slots))]


def cluster_slots(cfg: Config) -> int:
    """``launch.slots``, or one slot per site where the cluster section has a place (a core share or a GPU)
    for every site rank, else the most slots that fit (placement is monotonic in the number of ranks)."""
    from ..errors import ConfigError
    from ..topology import sites_by_rank_count

    k = len(cfg.sites)
    if cfg.launch.slots:
        return cfg.launch.slots

    def fits(s: int) -> bool:
        try:
            cluster_places(cfg, slot_groups(cfg, s))
            return True
        except ConfigError:
            return False

    lo, hi = len(sites_by_rank_count([s.ranks for s in cfg.sites])), k
    if fits(hi):
        return hi
    if not fits(lo):
        return lo  # the smallest layout's error is the one worth showing
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


NODE_LOCAL = ("/tmp", "/dev/shm", "/run/user")  # per node on most clusters


def node_local_paths(cfg: Config, cwd: Optional[Path] = None) -> List[str]:
    """``key path`` of each path a multi-node job needs on every node but that lies in a usually
    node-local folder (the submit directory, run.root, cluster.python); empty for one node."""
    if cfg.cluster.nodes < 2:
        return []
    cwd = cwd or Path.cwd()
    found = []
    for key, raw in (("the submit directory", str(cwd)), ("run.root", cfg.run.root),
                     ("cluster.python", cfg.cluster.python)):
        if key == "cluster.python" and "/" not in raw:
            continue  # found on each node's PATH
        path = (cwd / raw).resolve() if not Path(raw).is_absolute() else Path(raw)
        if any(path == Path(d) or path.is_relative_to(d) for d in NODE_LOCAL):
            found.append(f"{key} {path}")
    return found


def cluster_places(cfg: Config, groups: Optional[Sequence[Tuple[str, int]]] = None):
    """Every rank's place; ``groups``: the (name, ranks) of the process groups to keep on one node
    (default: the slots :func:`cluster_slots` chooses; one per site when they fit)."""
    c = cfg.cluster
    if groups is None:
        groups = slot_groups(cfg, cluster_slots(cfg))
    return place(cluster_shape(cfg), list(groups), c.aggregator_cores, c.aggregator_own_node, c.cores_per_rank,
                 c.oversubscribe, c.ranks_per_gpu)


def _q(argv: Sequence[str]) -> str:
    return shlex.join([str(a) for a in argv])


def hpcfl_command(cfg: Config, args: Sequence[str], gpu: bool = False) -> str:
    """``python -m hpcfl ARGS`` as a shell line, inside the container when there is one.
    The submit directory is bound so that configs, data and runs/ are where the job expects them."""
    c = cfg.cluster
    line = _q([c.python, "-m", "hpcfl", *args])
    if not c.container:
        return line
    binds = ",".join(shlex.quote(b) for b in c.binds)
    prefix = _q(["singularity", "exec", *(["--nv"] if gpu else [])])
    return f'{prefix} --bind "$SLURM_SUBMIT_DIR"{"," + binds if binds else ""} {shlex.quote(c.container)} {line}'


def rank_command(cfg: Config, config_path: str, overrides: Sequence[str]) -> str:
    """What every rank runs: ``--pin cluster`` (each rank pins itself to its place's cores and GPU if the
    launcher did not, after checking the place against its node)."""
    args = ["run", config_path, *[a for o in overrides for a in ("--set", o)], "--pin", "cluster"]
    return hpcfl_command(cfg, args, gpu=bool(cluster_shape(cfg).gpus_per_node))


def render_sbatch(cfg: Config, config_path: str, overrides: Sequence[str] = (),
                  launcher: Optional[str] = None) -> str:
    """The sbatch script (text) for a config; raises ConfigError if the request cannot fit."""
    c = cfg.cluster
    launcher = launcher or c.launcher
    slots = cluster_slots(cfg)
    places = cluster_places(cfg, slot_groups(cfg, slots))
    n = len(places)
    lines = _sbatch_header(cfg, config_path, overrides, launcher, slots, ranks_per_node(places, c.nodes), n)
    lines += ["", "set -euo pipefail"]
    lines += [f"module load {m}" for m in c.modules]
    lines += list(c.setup)
    lines += [
        "export OMP_NUM_THREADS=1  # ranks set their torch threads to their cores",
        'nodes="$(mktemp)"; placement="$(mktemp)"; trap \'rm -f "$nodes" "$placement"\' EXIT',
        'scontrol show hostnames "$SLURM_JOB_NODELIST" > "$nodes"',
    ]
    lines += _launch_lines(cfg, config_path, overrides, launcher, n)
    if c.signal_s:
        launch = lines.pop() + " &"
        trap, rest = _graceful_stop(f"{cfg.run.root}/{cfg.run.name}", c.requeue)
        lines += [trap, launch, *rest]
    return "\n".join(lines) + "\n"


def _sbatch_header(cfg: Config, config_path: str, overrides: Sequence[str], launcher: str, slots,
                   per_node: List[int], n: int) -> List[str]:
    """The comment that says what the script runs, and its #SBATCH lines (``n`` ranks)."""
    c = cfg.cluster
    shape = cluster_shape(cfg)
    name = cfg.run.name
    lines = [
        "#!/bin/bash",
        f"# hpcfl federation {name!r}: {expected_layout([(s.name, s.ranks) for s in cfg.sites], slots)},",
        f"# on {c.nodes} node(s) of {shape.sockets_per_node}x{shape.cores_per_socket} cores"
        + (f" and {shape.gpus_per_node} GPUs" if shape.gpus_per_node else "") + f"; ranks per node: {per_node}.",
        f"# Rendered by: hpcfl render {_q([config_path, *[a for o in overrides for a in ('--set', o)]])} --launcher {launcher}",
        "# Re-render after changing the config instead of editing this file. Submit: sbatch <this file>.",
        "# Results: runs/<name>/ under the submit directory; the job log: hpcfl-<name>-<jobid>.out.",
        f"#SBATCH --job-name=hpcfl-{name}",
        f"#SBATCH --nodes={c.nodes}",
        f"#SBATCH --ntasks={n}",
        *([] if c.oversubscribe else [f"#SBATCH --ntasks-per-node={max(per_node)}"]),
        "#SBATCH --exclusive",
        f"#SBATCH --time={c.time_limit}",
        f"#SBATCH --output=hpcfl-{name}-%j.out",
        f"#SBATCH --comment=hpcfl:{cfg.run.root}/{name}",
    ]
    if c.oversubscribe:
        lines.append("#SBATCH --overcommit  # cluster.oversubscribe: more ranks than cores")
    if shape.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={shape.gpus_per_node}")
    for flag, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos), ("mem", c.mem_per_node)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if c.requeue:
        lines.append("#SBATCH --requeue  # a requeued job resumes after its last complete round")
    if c.signal_s:
        lines.append(f"#SBATCH --signal=B:USR1@{c.signal_s}  # warning before the time limit: checkpoint, then requeue")
    return lines


def _launch_lines(cfg: Config, config_path: str, overrides: Sequence[str], launcher: str, n: int) -> List[str]:
    """Where each rank goes (``hpcfl placement``), then the launcher's command; the last line starts the ranks."""
    c = cfg.cluster
    cfg_args = [config_path, *[a for o in overrides for a in ("--set", o)]]
    run = rank_command(cfg, config_path, overrides)
    where = lambda fmt: hpcfl_command(cfg, ["placement", *cfg_args, "--nodes-file"]) + f' "$nodes" --format {fmt} > "$placement"'
    if launcher == "srun":
        return [
            where("hostfile"),
            'export SLURM_HOSTFILE="$placement"  # one line per rank: the node of its place',
            _q(["srun", f"--mpi={c.srun_mpi}", f"--ntasks={n}", "--distribution=arbitrary", "--cpu-bind=none",
                *(["--gpu-bind=none"] if cluster_shape(cfg).gpus_per_node else []), "--kill-on-bad-exit=1"])
            + " \\\n    " + run,
        ]
    if launcher == "mpirun":
        return [
            where("rankfile"),
            _q(["mpirun", "-np", str(n), "--report-bindings", *(["--oversubscribe"] if c.oversubscribe else []),
                "-x", "OMP_NUM_THREADS"])
            + ' --rankfile "$placement" \\\n    ' + run,
        ]
    # horovodrun: hosts and slot counts from the placement; ranks pin themselves
    return [
        where("hosts"),
        _q(["horovodrun", "-np", str(n), "--mpi"]) + ' -H "$(cat "$placement")" \\\n    '
        + _q(["--binding-args=--bind-to none"]) + " " + run,
    ]


def _graceful_stop(run_dir: str, requeue: bool):
    """Shell lines: on SLURM's warning signal, ask rank 0 to stop after the round in progress
    (it checkpoints, every rank exits cleanly); then requeue the job, which resumes from there."""
    d = _q([run_dir])
    trap = (f"trap 'echo \"hpcfl: warning signal: the federation checkpoints after the round in progress\"; "
            f"touch {d}/stop-requested' USR1")
    lines = [
        "pid=$!",
        'while true; do  # wait returns early when the trapped signal arrives',
        '    wait "$pid" && rc=0 || rc=$?',
        '    kill -0 "$pid" 2>/dev/null || break',
        "done",
        '[ "$rc" = 0 ] || exit "$rc"',
    ]
    if requeue:
        lines += [
            f"if grep -q '\"stopped_after_round\"' {d}/summary.json 2>/dev/null; then",
            '    echo "hpcfl: requeueing job $SLURM_JOB_ID: it resumes after the last complete round"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    return trap, lines


def placement_text(cfg: Config, hostnames: Sequence[str], fmt: str) -> str:
    """What the job writes at start: the hostfile, rankfile or host list of the placement."""
    places = cluster_places(cfg)
    c, cps = cfg.cluster, cluster_shape(cfg).cores_per_socket
    if len(hostnames) < c.nodes:
        from ..errors import LaunchError

        raise LaunchError(f"cluster.nodes: the config asks for {c.nodes} nodes but the job has {len(hostnames)}")
    if fmt == "hostfile":
        return "".join(f"{hostnames[p.node]}\n" for p in places)
    if fmt == "rankfile":
        out = []
        for p in places:
            if p.cores:
                local = [k - p.socket * cps for k in p.cores]
                out.append(f"rank {p.rank}={hostnames[p.node]} slot={p.socket}:{local[0]}-{local[-1]}\n")
            else:
                out.append(f"rank {p.rank}={hostnames[p.node]} slot=0:0-{cps - 1}\n")
        return "".join(out)
    counts = ranks_per_node(places, c.nodes)
    return ",".join(f"{hostnames[i]}:{k}" for i, k in enumerate(counts) if k) + "\n"


def local_shape():
    """This machine as a one-node Shape, over the CPUs this process may use."""
    import os
    from pathlib import Path

    cpus = sorted(os.sched_getaffinity(0))
    packages = set()
    for c in cpus:
        f = Path(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id")
        packages.add(f.read_text().strip() if f.exists() else "0")
    sockets = max(1, len(packages))
    return Shape(1, sockets, max(1, len(cpus) // sockets), 0), cpus


def my_place(cfg: Config, rank: int, mode: str, groups: Optional[Sequence[Tuple[str, int]]] = None):
    """This rank's place: from cfg.cluster ("cluster"), or this machine, oversubscribed if need be ("local").
    ``groups``: as for :func:`cluster_places`."""
    if mode == "local":
        shape, cpus = local_shape()
        groups = [(s.name, s.ranks) for s in cfg.sites] if groups is None else list(groups)
        places = place(shape, groups, aggregator_cores=0, oversubscribe=True, cores_per_rank=1)
        p = places[rank]
        return p, [cpus[k] for k in p.cores]
    p = cluster_places(cfg, groups)[rank]
    return p, list(p.cores)
