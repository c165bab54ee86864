"""A rank's start-up (``hpcfl run``), in order: rank 0 reads the config (path + overrides, once), prepares the run
directory and the data every site reads, and tells every rank the resolved config; each rank opens its log (so
everything after can be reported), starts its heartbeat, pins itself to its place (checked against the node
first), and only then imports torch, chooses its device and builds its slot's sites.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from ..config import Config
from ..errors import HpcflError

log = logging.getLogger("hpcfl")
PIN_MODES = ("none", "local", "cluster")


@dataclass(frozen=True)
class RankLaunch:
    """What a launcher tells the ranks besides the config: typed, on the command line (the one environment
    variable still read, HPCFL_PIN, serves scripts rendered before ``--pin`` existed: :func:`legacy_pin`).
    ``pin``: local = ranks pin themselves to this machine's cores (mpirun could not bind oversubscribed
    ranks); cluster = to their place in ``cluster:`` (a rendered job)."""

    resume: bool = False
    restart: bool = False
    pin: str = "none"

    def argv(self) -> list:
        return ((["--resume"] if self.resume else []) + (["--restart"] if self.restart else [])
                + (["--pin", self.pin] if self.pin != "none" else []))


def legacy_pin() -> str:
    """Scripts rendered by earlier versions set HPCFL_PIN=1 instead of passing --pin cluster."""
    v = os.environ.get("HPCFL_PIN", "")
    return {"1": "cluster", "cluster": "cluster", "local": "local"}.get(v, "none")


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("hpcfl", "numpy", "torch", "mpi4py", "horovod"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    try:
        from mpi4py import MPI

        out["mpi"] = MPI.Get_library_version().strip().strip("\x00").splitlines()[0].strip("\x00")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def _node_share(world) -> tuple:
    """(site ranks on this node, this rank's index among them): threads and GPUs are shared by them."""
    from mpi4py import MPI

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    flags = node.allgather(world.Get_rank() != 0)
    mine = node.Get_rank()
    node.Free()
    return max(1, sum(flags)), sum(flags[:mine])


def _threads_for(cfg: Config, on_node: int) -> int:
    """torch threads: the config's, else this rank's share of the cores it may run on."""
    if cfg.train.threads:
        return cfg.train.threads
    cores = len(os.sched_getaffinity(0))
    # Ranks pinned by the launcher (or by themselves) see only their own cores; unpinned ones share the node's.
    return max(1, cores if cores < (os.cpu_count() or cores) else cores // on_node)


def rank_info(role, threads: int, device=None, backend=None, cfg: Optional[Config] = None) -> Dict[str, Any]:
    from ..device import cuda_aware_mpi, device_info
    from ..topology import listed

    info = {
        "rank": role.rank, "role": role.kind, "site": role.names[0] if len(role.names) == 1 else None,
        "sites": listed(role.names), "slot": role.slot.index if role.slot else None,
        "rank_in_site": role.rank_in_slot, "site_leader": role.is_leader,
        "host": socket.gethostname(), "pid": os.getpid(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)), "torch_threads": threads,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "versions": _versions(),
    }
    if device is not None:
        info["device"] = device_info(device)
        info["gpu"] = info["device"] if device.type == "cuda" else None
        info["cuda_aware_mpi"] = cuda_aware_mpi()
    if backend is not None:
        info["backend"] = backend.info()
    if cfg is not None and not role.is_aggregator:
        info["precision"] = cfg.train.precision
    return plain(info)


def plain(x: Any) -> Any:
    """``x`` with str, int and float subclasses made plain, recursively.

    Why: rank 0 unpickles what the ranks send it, and unpickling a ``torch.__version__``
    (a TorchVersion, a str subclass) imports torch there: seconds of start-up and ~300 MB
    on the one process that never needs torch.
    """
    if isinstance(x, bool) or x is None:
        return x
    for t in (str, int, float):
        if isinstance(x, t):
            return t(x)
    if isinstance(x, dict):
        return {plain(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(map(plain, x)) if type(x) in (list, tuple) else list(map(plain, x))
    return x


def setup_logging(path, rank: int, to_console: bool):
    root = logging.getLogger("hpcfl")
    root.setLevel(logging.INFO)
    root.propagate = False
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s"))
    root.addHandler(fh)
    if to_console:
        ch = logging.StreamHandler(sys.stderr)
        ch.setLevel(logging.WARNING)
        ch.setFormatter(logging.Formatter("hpcfl: %(message)s"))
        ch.addFilter(lambda record: getattr(record, "console", True))  # extra={"console": False}: the log only
        root.addHandler(ch)
    return fh.stream


def pin_rank(cfg: Config, rank: int, mode: str, groups) -> Optional[list]:
    """Pin this rank to its place's cores (and GPU) unless the launcher already did; the place is first
    checked against the node (one line naming the cluster key that disagrees).

    Must run before torch is imported (CUDA_VISIBLE_DEVICES). Returns the CPUs pinned to, or None.
    """
    if mode not in ("cluster", "local"):
        return None
    from ..cluster.render import my_place

    place, cpus = my_place(cfg, rank, mode, groups)
    if mode == "cluster":
        from ..cluster.nodecheck import check_place, node_facts

        check_place(cfg.cluster, place, node_facts())
    if place.gpu is not None:
        from ..cluster.nodecheck import visible_device_for

        visible = visible_device_for(os.environ.get("CUDA_VISIBLE_DEVICES"), place.gpu, rank)
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    launcher_bound = len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    if not cpus or launcher_bound:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus


def install_stop_handler(rank: int) -> None:
    """SIGUSR1 (SLURM's warning before the time limit) asks rank 0 to stop after the round in progress.

    Other ranks ignore it (its default action would kill them mid-collective): rank 0 tells them.
    """
    import signal

    from ..protocol.server import request_stop

    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return  # someone (a test harness, an embedding program) already handles it
    signal.signal(signal.SIGUSR1, request_stop if rank == 0 else signal.SIG_IGN)


class Clock:
    """Logs how long each start-up phase took: users feel every second of start-up."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: Dict[str, float] = {}

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self.laps[what] = now - self.t
        log.info("start-up: %s took %.3fs", what, now - self.t)
        self.t = now


def prepare(world, config_path: str, overrides: Sequence[str], launch: RankLaunch, state: Dict[str, Any]):
    """Rank 0 resolves the config and prepares (and locks) the run directory; every rank gets
    (config, start round, checkpoint or None, the RunDir: rank 0's is the one holding the lock)."""
    from ..config import from_dict, load_config, to_dict
    from ..rundir import RunDir

    rank = world.Get_rank()
    ckpt, setup_error, outcome, rundir = None, None, None, None
    if rank == 0:
        try:
            cfg = load_config(config_path, overrides)
            rundir = RunDir(cfg)
            ckpt = rundir.prepare(resume=launch.resume, restart=launch.restart)
            state["rundir"] = rundir  # a failure from here on releases its lock
            stale = rundir.stop_file
            if stale.exists():  # left by a job that died before it could act on it
                stale.unlink()
            if cfg.data.name == "tiles":
                from ..wsi.prepare import prepare_for_run

                prepare_for_run(cfg)  # once, before any site rank reads the index
            from ..tasks import task_class

            task_class(cfg.task).prepare_data(cfg)  # e.g. task segment: volumes made or checked, masks checked
            outcome = ("ok", to_dict(cfg), int(ckpt["round"]) + 1 if ckpt else 1)
        except HpcflError as exc:
            setup_error, outcome = exc, ("error", str(exc))
    outcome = world.bcast(outcome, root=0)
    if outcome[0] == "error":
        if setup_error is not None:
            raise setup_error
        return None
    cfg = from_dict(outcome[1], f"{config_path} (as resolved by rank 0)")
    return cfg, outcome[2], ckpt, rundir or RunDir(cfg)


@dataclass
class StartedRank:
    """What a started rank holds, whatever its role."""

    topology: Any
    role: Any
    beat: Any
    clock: "Clock"
    comms: Any
    threads: int
    local_index: int
    watchdog: Any


def start_rank(world, cfg: Config, rundir, launch: RankLaunch, state: Dict[str, Any]) -> StartedRank:
    """Log, heartbeat, pinning (checked against the node), communicators, threads, watchdog: in this order,
    so that everything after the log exists can be reported."""
    from ..comm import split_comms
    from ..topology import topology_for
    from ..watchdog import Heartbeat, Watchdog, end_job_on_hang

    rank = world.Get_rank()
    state["rundir"] = rundir
    log_stream = setup_logging(rundir.log_path(rank), rank, to_console=(rank == 0))
    topology = topology_for(cfg, world.Get_size())
    role = topology.role(rank)
    state["role"] = role
    beat = Heartbeat(rundir, rank, role.describe(), log_file=log_stream).start()
    state["beat"] = beat
    _start_reach_probe(rank, beat, rundir)
    pinned = pin_rank(cfg, rank, launch.pin, [(f"slot{s.index}", s.size) for s in topology.slots])
    log.info("%s starting on %s (pid %d)%s", role.describe(), socket.gethostname(), os.getpid(),
             f"; pinned to CPUs {pinned}" if pinned else "")
    if rank == 0:
        log.info("%d sites on %d slots: %s", len(topology.sites), len(topology.slots),
                 "; ".join(f"slot {s.index} (ranks {s.ranks[0]}-{s.ranks[-1]}): {len(s.sites)} site(s)"
                           for s in topology.slots[:8]) + (" ..." if len(topology.slots) > 8 else ""))
    clock = Clock()
    comms = split_comms(world, role)
    on_node, local_index = _node_share(world)
    clock.lap("communicators")
    threads = _threads_for(cfg, on_node)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    watchdog = None
    f = cfg.fault
    if rank == 0:  # rank 0 watches every rank; slot leaders watch rank 0
        watchdog = Watchdog(rundir, range(1, world.Get_size()), f.hang_timeout_s, f.hang_floor_s,
                            end_job_on_hang(rundir, world, beat), own=beat, min_s=f.hang_min_s).start()
    elif role.is_leader:
        watchdog = Watchdog(rundir, [0], f.hang_timeout_s, f.hang_floor_s,
                            end_job_on_hang(rundir, world, beat), own=beat, stale_only=True).start()
    return StartedRank(topology, role, beat, clock, comms, threads, local_index, watchdog)


def _start_reach_probe(rank: int, beat, rundir) -> None:
    """Rank 0 listens, the others check every few seconds that they reach it (hpcfl.reach): a node cut off
    from the network is then named, not taken for a stuck rank on another node."""
    from ..reach import Prober, ProbeServer

    try:
        if rank == 0:
            beat.state["probe"] = ProbeServer().address
        else:
            Prober(beat, rundir.beat_path(0))
    except OSError as exc:  # no TCP here: the watchdog judges without it
        log.info("no reachability probe: %s", exc)


def build_slot(cfg, topology, role, comms, rundir, start_round, local_index, beat, clock):
    """This rank's device, backend, data of every site its slot simulates, trainer and slot worker."""
    from ..device import Stager, cuda_aware_mpi, select_device
    from ..privacy.server import run_strategy
    from ..site.backend import make_backend
    from ..site.data import SiteRank, make_site_data
    from ..site.slot import SiteCache, SiteState, SlotWorker
    from ..site.trainer import SiteSettings, SiteTrainer
    from ..tasks import DataSpec, make_task

    device = select_device(cfg.train.device, local_index)
    shared: Dict[str, Any] = {}

    def make_state(site) -> SiteState:
        beat.phase("load data", 0, site.name)
        who = SiteRank(site, role.rank_in_slot, site.virtual_rank(role.rank_in_slot))
        data = make_site_data(cfg, topology, who, rundir.path, shared, device)
        return SiteState(site, who, data, SiteSettings.of(cfg, site.index))

    states = SiteCache(make_state, max(256, cfg.eval.sites_max + 64))
    first = states[topology.sites[role.slot.sites[0]]].data
    clock.lap(f"load data (1 of {len(role.slot.sites)} site(s); the others on first use)")
    beat.phase("start-up: site backend")
    backend = make_backend(cfg.site.backend, topology, role, comms.trainers, device)
    clock.lap(f"start {backend.name}")
    task = make_task(cfg)
    strategy = run_strategy(cfg, len(topology.sites))  # rank 0's, without its noise: sites need its upload weight
    spec = DataSpec(tuple(first.input_shape), int(first.num_classes))
    trainer = SiteTrainer(cfg, task, spec, backend, device, strategy)
    clock.lap("build model and optimizer")
    stager = Stager(device, cfg.launch.chunk_mb, direct=cuda_aware_mpi() if device.type == "cuda" else False)
    worker = SlotWorker(cfg, topology, role, comms, trainer, states, start_round, rundir.path, stager, beat)
    trainer.on_step = beat.tick
    partition = None
    if role.rank == topology.slots[0].leader:
        partition = first.partition_record(topology.names)
    return worker, device, backend, partition
