"""What every rank executes (``hpcfl run``), under any launcher.

Start-up, in order: rank 0 reads the config (path + overrides, once), prepares
the run directory and tells every rank the resolved config; each rank opens its
log (so everything after can be reported), starts its heartbeat, pins itself to
its place (checked against the node first), and only then imports torch,
chooses its device and builds its slot's sites.

Also the failure contract: an exception on any rank is logged with its
traceback to ``logs/rank-NNNN.log``, recorded in ``logs/rank-NNNN.error.json``,
printed as ONE line naming the rank and its site, and then the rank calls
``MPI_Abort`` so the whole job ends within seconds instead of the other ranks
waiting forever in their collectives. A rank that hangs instead is caught by
the watchdog (:mod:`hpcfl.watchdog`).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from .config import Config
from .errors import ConfigError, HpcflError, TopologyError

log = logging.getLogger("hpcfl")
ABORT_GRACE_S = 1.0
PIN_MODES = ("none", "local", "cluster")


@dataclass(frozen=True)
class RankLaunch:
    """What a launcher tells the ranks besides the config: typed, on the command line (never in
    environment variables). ``pin``: local = ranks pin themselves to this machine's cores (mpirun
    could not bind oversubscribed ranks); cluster = to their place in ``cluster:`` (a rendered job)."""

    resume: bool = False
    restart: bool = False
    pin: str = "none"

    def argv(self) -> list:
        return ((["--resume"] if self.resume else []) + (["--restart"] if self.restart else [])
                + (["--pin", self.pin] if self.pin != "none" else []))


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
    from .device import cuda_aware_mpi, device_info
    from .topology import listed

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


def _setup_logging(path, rank: int, to_console: bool):
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


def run_rank(config_path: str, overrides: Sequence[str] = (), resume: bool = False, restart: bool = False,
             pin: Optional[str] = None) -> int:
    """Entry point of one rank. Returns 0, or ends the whole MPI job on failure."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    state: Dict[str, Any] = {"role": None, "rundir": None, "round": None, "started": False, "beat": None}
    launch = RankLaunch(resume=resume, restart=restart, pin=pin or _legacy_pin())
    try:
        return _run(world, config_path, overrides, launch, state)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job, not hang it
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        _fail(world, rank, exc, state)
        return 1  # not reached: Abort does not return


def _legacy_pin() -> str:
    """Scripts rendered by earlier versions set HPCFL_PIN=1 instead of passing --pin cluster."""
    v = os.environ.get("HPCFL_PIN", "")
    return {"1": "cluster", "cluster": "cluster", "local": "local"}.get(v, "none")


def _fail(world, rank: int, exc: BaseException, state: Dict[str, Any]) -> None:
    role = state["role"]
    who = role.describe() if role is not None else f"rank {rank}"
    what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, HpcflError) else str(exc)
    line = f"hpcfl: {who} failed: {what}"
    tb = traceback.format_exc()
    if log.handlers:
        log.error("%s\n%s", line, tb, extra={"console": False})  # the console gets the line once, below
    rundir = state["rundir"]
    if rundir is not None and rundir.logs.is_dir():
        from .atomic import write_atomic

        try:
            write_atomic(rundir.error_path(rank), json.dumps({
                "rank": rank, "role": role.kind if role else None,
                "site": role.names[0] if role and len(role.names) == 1 else None,
                "error": what, "type": type(exc).__name__, "line": line, "time": time.time(), "traceback": tb,
            }))
        except HpcflError:  # best effort: the log and the stderr line still report the failure
            pass
    if state.get("beat") is not None:
        state["beat"].stop("failed")
    if rank == 0 and rundir is not None:
        rundir.release_lock()
    # Errors every rank sees identically (a bad config, a wrong rank count) are reported once, by rank 0;
    # a node that cannot give a rank its place is seen by the ranks on that node only.
    from .cluster.nodecheck import NodeMismatch

    same_everywhere = (isinstance(exc, (ConfigError, TopologyError)) and not isinstance(exc, NodeMismatch)
                       and not state["started"])
    if rank == 0 or not same_everywhere:
        sys.stderr.write(line + "\n")
        if not isinstance(exc, HpcflError):
            sys.stderr.write(f"hpcfl: traceback in {rundir.log_path(rank) if rundir else 'the rank log'}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    logging.shutdown()
    if world.Get_size() > 1:
        time.sleep(ABORT_GRACE_S)  # let mpirun forward our line before it tears the job down
        world.Abort(1)
    sys.exit(1)


def _pin(cfg: Config, rank: int, mode: str, groups) -> Optional[list]:
    """Pin this rank to its place's cores (and GPU) unless the launcher already did; the place is first
    checked against the node (one line naming the cluster key that disagrees).

    Must run before torch is imported (CUDA_VISIBLE_DEVICES). Returns the CPUs pinned to, or None.
    """
    if mode not in ("cluster", "local"):
        return None
    from .cluster.render import my_place

    place, cpus = my_place(cfg, rank, mode, groups)
    if mode == "cluster":
        from .cluster.nodecheck import check_place, node_facts

        check_place(cfg.cluster, place, node_facts())
    if place.gpu is not None:
        from .cluster.nodecheck import visible_device_for

        visible = visible_device_for(os.environ.get("CUDA_VISIBLE_DEVICES"), place.gpu, rank)
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    launcher_bound = len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    if not cpus or launcher_bound:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus


def _install_stop_handler(rank: int) -> None:
    """SIGUSR1 (SLURM's warning before the time limit) asks rank 0 to stop after the round in progress.

    Other ranks ignore it (its default action would kill them mid-collective): rank 0 tells them.
    """
    import signal

    from .protocol.server import request_stop

    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return  # someone (a test harness, an embedding program) already handles it
    signal.signal(signal.SIGUSR1, request_stop if rank == 0 else signal.SIG_IGN)


class _Clock:
    """Logs how long each start-up phase took: users feel every second of start-up."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: Dict[str, float] = {}

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self.laps[what] = now - self.t
        log.info("start-up: %s took %.3fs", what, now - self.t)
        self.t = now


def _prepare(world, config_path: str, overrides: Sequence[str], launch: RankLaunch, state: Dict[str, Any]):
    """Rank 0 resolves the config and prepares (and locks) the run directory; every rank gets
    (config, start round, checkpoint or None, the RunDir: rank 0's is the one holding the lock)."""
    from .config import from_dict, load_config, to_dict
    from .rundir import RunDir

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
                from .wsi.prepare import prepare_tiles

                if cfg.data.tiles.backend == "cucim" and cfg.data.tiles.cache.type == "per_process":
                    sys.stderr.write("hpcfl: warning: data.tiles.cache.type: per_process can serve another slide's "
                                     "tile at the same position with cuCIM 26.10 (rapidsai/cucim#1108); "
                                     "shared_memory (the default) or nocache cannot\n")

                prepare_tiles(cfg, progress=False)  # once, before any site rank reads the index
            from .tasks import task_class

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


def _run(world, config_path: str, overrides: Sequence[str], launch: RankLaunch, state: Dict[str, Any]) -> int:
    from .comm import quiet_barrier

    rank = world.Get_rank()
    _install_stop_handler(rank)
    prepared = _prepare(world, config_path, overrides, launch, state)
    if prepared is None:
        return 1  # rank 0 reports it and ends the job
    cfg, start_round, ckpt, rundir = prepared
    r = _start_rank(world, cfg, rundir, launch, state)
    if start_round > cfg.fl.rounds:
        if rank == 0:
            print(f"hpcfl: {rundir.path} already completed {start_round - 1} rounds (fl.rounds = {cfg.fl.rounds}); "
                  f"nothing to do. Raise fl.rounds to continue training.")
            rundir.close()  # the lock: the next launch must not find it held
        if r.watchdog is not None:
            r.watchdog.stop()
        r.beat.stop()
        return 0
    worker = device = backend = partition = None
    if not r.role.is_aggregator:  # the aggregator works on plain arrays and never imports torch
        r.beat.phase("start-up: import torch")
        import torch

        torch.set_num_threads(r.threads)
        r.clock.lap("import torch")
        worker, device, backend, partition = _build_slot(cfg, r.topology, r.role, r.comms, rundir, start_round,
                                                         r.local_index, r.beat, r.clock)
    r.beat.phase("start-up barrier")
    quiet_barrier(world)  # ranks that are ready sleep while the others import and load
    r.clock.lap("wait for the other ranks")
    info = rank_info(r.role, r.threads, device, backend, cfg)
    info["startup_s"] = dict(r.clock.laps)
    infos = world.gather((info, plain(partition)), root=0)
    r.clock.lap("manifest")
    state["started"] = True
    if rank == 0:
        _aggregate(cfg, r, rundir, ckpt, start_round, infos)
    else:
        worker.run()
    r.beat.phase("done")
    if r.watchdog is not None:
        r.watchdog.stop()
    # Everyone must be done before a backend shuts down: Horovod's shutdown is global across
    # process sets, and would abort another slot's allreduce still in flight.
    quiet_barrier(world)
    if worker is not None:
        worker.states.close()
        backend.shutdown()
    r.beat.stop()
    log.info("done")
    if "cucim" in sys.modules:
        _late_stderr_to(rundir.log_path(rank))
    return 0


def _late_stderr_to(log_path) -> None:
    """What a rank that finished writes to stderr from now on (interpreter and MPI teardown) goes to its log.

    Why: with the shared_memory tile cache, cuCIM 26.10's destructor prints "[Warning] Couldn't delete
    the shared memory object 'cucim-shm.N'." (no newline) at every normal exit, though the segment is
    gone (checked: nothing is left in /dev/shm); on the terminal it reads like a fault after a good run.
    """
    try:
        sys.stderr.flush()
        fd = os.open(str(log_path), os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


@dataclass
class _Rank:
    """What a started rank holds, whatever its role."""

    topology: Any
    role: Any
    beat: Any
    clock: "_Clock"
    comms: Any
    threads: int
    local_index: int
    watchdog: Any


def _start_rank(world, cfg: Config, rundir, launch: RankLaunch, state: Dict[str, Any]) -> _Rank:
    """Log, heartbeat, pinning (checked against the node), communicators, threads, watchdog: in this order,
    so that everything after the log exists can be reported."""
    from .comm import split_comms
    from .topology import topology_for
    from .watchdog import Heartbeat, Watchdog, end_job_on_hang

    rank = world.Get_rank()
    state["rundir"] = rundir
    log_stream = _setup_logging(rundir.log_path(rank), rank, to_console=(rank == 0))
    topology = topology_for(cfg, world.Get_size())
    role = topology.role(rank)
    state["role"] = role
    beat = Heartbeat(rundir.logs, rank, role.describe(), log_file=log_stream).start()
    state["beat"] = beat
    _start_reach_probe(rank, beat, rundir)
    pinned = _pin(cfg, rank, launch.pin, [(f"slot{s.index}", s.size) for s in topology.slots])
    log.info("%s starting on %s (pid %d)%s", role.describe(), socket.gethostname(), os.getpid(),
             f"; pinned to CPUs {pinned}" if pinned else "")
    if rank == 0:
        log.info("%d sites on %d slots: %s", len(topology.sites), len(topology.slots),
                 "; ".join(f"slot {s.index} (ranks {s.ranks[0]}-{s.ranks[-1]}): {len(s.sites)} site(s)"
                           for s in topology.slots[:8]) + (" ..." if len(topology.slots) > 8 else ""))
    clock = _Clock()
    comms = split_comms(world, role)
    on_node, local_index = _node_share(world)
    clock.lap("communicators")
    threads = _threads_for(cfg, on_node)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    watchdog = None
    f = cfg.fault
    if rank == 0:  # rank 0 watches every rank; slot leaders watch rank 0
        watchdog = Watchdog(rundir.logs, range(1, world.Get_size()), f.hang_timeout_s, f.hang_floor_s,
                            end_job_on_hang(rundir, world, beat), own=beat, min_s=f.hang_min_s).start()
    elif role.is_leader:
        watchdog = Watchdog(rundir.logs, [0], f.hang_timeout_s, f.hang_floor_s,
                            end_job_on_hang(rundir, world, beat), own=beat, stale_only=True).start()
    return _Rank(topology, role, beat, clock, comms, threads, local_index, watchdog)


def _start_reach_probe(rank: int, beat, rundir) -> None:
    """Rank 0 listens, the others check every few seconds that they reach it (hpcfl.reach): a node cut off
    from the network is then named, not taken for a stuck rank on another node."""
    from .reach import Prober, ProbeServer
    from .watchdog import beat_path

    try:
        if rank == 0:
            beat.state["probe"] = ProbeServer().address
        else:
            Prober(beat, beat_path(rundir.logs, 0))
    except OSError as exc:  # no TCP here: the watchdog judges without it
        log.info("no reachability probe: %s", exc)


def _aggregate(cfg: Config, r: _Rank, rundir, ckpt, start_round: int, infos) -> None:
    """Rank 0: the manifest, then the federation's rounds, then the summary."""
    from .protocol.server import Aggregator
    from .report import Progress
    from .topology import listed

    topology, names = r.topology, r.topology.names
    part = next((p for _, p in infos if p is not None), None)
    rundir.write_json("manifest.json", {
        "run": cfg.run.name, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from_round": start_round - 1, "world_size": topology.world_size, "sites": len(topology.sites),
        "slots": [{"ranks": list(s.ranks), "sites": listed(names, s.sites),
                   "backend": infos[s.leader][0].get("backend")} for s in topology.slots],  # as the slot really ran
        "argv": sys.argv, "ranks": [i for i, _ in infos], "partition": part,
    })
    agg = Aggregator(cfg, topology, r.comms, rundir, ckpt)
    progress = Progress(cfg, topology, rundir, agg.start_round, headline=agg.task.headline or agg.task.metrics[:2])
    summary = agg.run(progress, r.beat)
    summary["startup_s"] = dict(r.clock.laps)
    summary["aggregator_imported_torch"] = "torch" in sys.modules  # it must not: start-up time and memory
    rundir.write_json("summary.json", summary)
    rundir.close()


def _build_slot(cfg, topology, role, comms, rundir, start_round, local_index, beat, clock):
    """This rank's device, backend, data of every site its slot simulates, trainer and slot worker."""
    from .aggregation import strategy_for
    from .device import Stager, cuda_aware_mpi, select_device
    from .site import make_backend
    from .site.data import SiteRank, make_site_data
    from .site.slot import SiteCache, SiteState, SlotWorker
    from .site.trainer import SiteSettings, SiteTrainer
    from .tasks import DataSpec, make_task

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
    strategy = strategy_for(cfg.fl)
    if cfg.privacy.dp is not None:
        from .privacy.server import DifferentialPrivacy

        strategy = DifferentialPrivacy(strategy, cfg.privacy.dp)  # sites need its upload weight only
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
