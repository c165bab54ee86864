"""What every rank executes (``hpcfl run``), under any launcher.

Also the failure contract: an exception on any rank is logged with its
traceback to ``logs/rank-NNNN.log``, recorded in ``logs/rank-NNNN.error.json``,
printed as ONE line naming the rank and its site, and then the rank calls
``MPI_Abort`` so the whole job ends within seconds instead of the other ranks
waiting forever in their collectives.
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
from typing import Any, Dict, Optional, Sequence

from .config import Config, load_config
from .errors import ConfigError, HpcflError, TopologyError

log = logging.getLogger("hpcfl")
ABORT_GRACE_S = 1.0


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("hpcfl", "numpy", "torch", "mpi4py", "horovod"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    try:
        from mpi4py import MPI

        out["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def _threads_for(cfg: Config, world) -> int:
    """torch threads: the config's, else this rank's share of the cores it may run on."""
    if cfg.train.threads:
        return cfg.train.threads
    from mpi4py import MPI

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    on_node = node.Get_size()
    node.Free()
    cores = len(os.sched_getaffinity(0))
    # Ranks pinned by the launcher see only their own cores; unpinned ones share the node's.
    return max(1, cores if cores < (os.cpu_count() or cores) else cores // on_node)


def rank_info(role, threads: int) -> Dict[str, Any]:
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        gpu = {"index": torch.cuda.current_device(), "name": torch.cuda.get_device_name()}
    return {
        "rank": role.rank, "role": role.kind, "site": role.site.name if role.site else None,
        "rank_in_site": role.rank_in_site, "site_leader": role.is_leader,
        "host": socket.gethostname(), "pid": os.getpid(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)), "torch_threads": threads, "gpu": gpu,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "versions": _versions(),
    }


def _setup_logging(path, rank: int, to_console: bool) -> None:
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
        root.addHandler(ch)


def run_rank(config_path: str, overrides: Sequence[str] = (), resume: bool = False, restart: bool = False) -> int:
    """Entry point of one rank. Returns 0, or ends the whole MPI job on failure."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    state: Dict[str, Any] = {"role": None, "rundir": None, "round": None, "started": False}
    try:
        return _run(world, config_path, overrides, resume, restart, state)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job, not hang it
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        _fail(world, rank, exc, state)
        return 1  # not reached: Abort does not return


def _fail(world, rank: int, exc: BaseException, state: Dict[str, Any]) -> None:
    role = state["role"]
    who = role.describe() if role is not None else f"rank {rank}"
    what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, HpcflError) else str(exc)
    line = f"hpcfl: {who} failed: {what}"
    tb = traceback.format_exc()
    if log.handlers:
        log.error("%s\n%s", line, tb)
    rundir = state["rundir"]
    if rundir is not None and rundir.logs.is_dir():
        try:
            rundir.error_path(rank).write_text(json.dumps({
                "rank": rank, "role": role.kind if role else None, "site": role.site.name if role and role.site else None,
                "error": what, "type": type(exc).__name__, "line": line, "time": time.time(), "traceback": tb,
            }))
        except OSError:  # best effort: the log and the stderr line still report the failure
            pass
    # Errors every rank sees identically (a bad config, a wrong rank count) are reported once, by rank 0.
    same_everywhere = isinstance(exc, (ConfigError, TopologyError)) and not state["started"]
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


def _pin(cfg: Config, rank: int):
    """HPCFL_PIN=cluster|local: pin this rank to its place's cores (and GPU) unless the launcher already did.

    Must run before torch is imported (CUDA_VISIBLE_DEVICES). Returns the CPUs pinned to, or None.
    """
    mode = os.environ.get("HPCFL_PIN", "")
    if mode not in ("cluster", "local", "1"):
        return None
    from .cluster.render import my_place

    place, cpus = my_place(cfg, rank, "local" if mode == "local" else "cluster")
    if place.gpu is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(place.gpu)
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

    from .federation import request_stop

    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return  # someone (a test harness, an embedding program) already handles it
    signal.signal(signal.SIGUSR1, request_stop if rank == 0 else signal.SIG_IGN)


class _Clock:
    """Logs how long each start-up phase took: users feel every second of start-up."""

    def __init__(self):
        self.t = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        log.info("start-up: %s took %.3fs", what, now - self.t)
        self.t = now


def _run(world, config_path: str, overrides: Sequence[str], resume: bool, restart: bool,
         state: Dict[str, Any]) -> int:
    from .comm import quiet_barrier, split_comms
    from .rundir import RunDir
    from .topology import topology_for

    rank = world.Get_rank()
    _install_stop_handler(rank)
    cfg = load_config(config_path, overrides)
    topology = topology_for(cfg, world.Get_size())
    role = topology.role(rank)
    state["role"] = role
    pinned = _pin(cfg, rank)
    rundir = RunDir(cfg)

    # Rank 0 owns the run directory; everyone learns the outcome (and where to resume) from it.
    ckpt = None
    setup_error: Optional[HpcflError] = None
    outcome: Any = None
    if rank == 0:
        try:
            ckpt = rundir.prepare(resume=resume, restart=restart)
            from .federation import STOP_FILE

            stale = rundir.path / STOP_FILE
            if stale.exists():  # left by a job that died before it could act on it
                log.warning("removing a stale %s", stale)
                stale.unlink()
            if cfg.data.name == "tiles":
                from .wsi.prepare import prepare_tiles

                prepare_tiles(cfg, progress=False)  # once, before any site rank reads the index
            outcome = ("ok", int(ckpt["round"]) + 1 if ckpt else 1)
        except HpcflError as exc:
            setup_error, outcome = exc, ("error", str(exc))
    outcome = world.bcast(outcome, root=0)
    if outcome[0] == "error":
        if setup_error is not None:
            raise setup_error
        return 1  # rank 0 reports it and ends the job
    start_round = outcome[1]
    state["rundir"] = rundir
    _setup_logging(rundir.log_path(rank), rank, to_console=(rank == 0))
    log.info("%s starting on %s (pid %d)%s", role.describe(), socket.gethostname(), os.getpid(),
             f"; pinned to CPUs {pinned}" if pinned else "")

    clock = _Clock()
    comms = split_comms(world, role)
    clock.lap("communicators")
    threads = _threads_for(cfg, world)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if not role.is_aggregator:  # the aggregator works on plain arrays and never imports torch
        import torch

        torch.set_num_threads(threads)
        clock.lap("import torch")

    if start_round > cfg.fl.rounds:
        if rank == 0:
            print(f"hpcfl: {rundir.path} already completed {start_round - 1} rounds (fl.rounds = {cfg.fl.rounds}); "
                  f"nothing to do. Raise fl.rounds to continue training.")
        return 0

    trainer = None
    partition = None
    if not role.is_aggregator:
        from .site import make_backend
        from .site.data import make_site_data
        from .site.trainer import SiteTrainer

        data = make_site_data(cfg, topology, role, rundir.path)
        clock.lap("load data")
        backend = make_backend(cfg.train.backend, topology, role, comms.trainers)
        clock.lap(f"start {cfg.train.backend}")
        trainer = SiteTrainer(cfg, topology, role, backend, data)
        clock.lap("build model and optimizer")
        if rank == topology.sites[0].leader:
            partition = data.partition_record([s.name for s in topology.sites])

    quiet_barrier(world)  # ranks that are ready sleep while the others import and load
    infos = world.gather((rank_info(role, threads), partition), root=0)
    clock.lap("manifest")
    state["started"] = True
    if rank == 0:
        from .federation import Aggregator

        part = next(p for _, p in infos if p is not None)
        rundir.write_json("manifest.json", {
            "run": cfg.run.name, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from_round": start_round - 1, "world_size": topology.world_size,
            "argv": sys.argv, "ranks": [i for i, _ in infos], "partition": part,
        })
        agg = Aggregator(cfg, topology, comms, rundir, ckpt)
        summary = agg.run()
        rundir.write_json("summary.json", summary)
        rundir.close()
    else:
        from .federation import SiteWorker

        SiteWorker(cfg, topology, role, comms, trainer, start_round).run()
    # Everyone must be done before Horovod shuts down: its shutdown is global across
    # process sets, and would abort another site's allreduce still in flight.
    quiet_barrier(world)
    if trainer is not None:
        trainer.data.close()
        trainer.backend.shutdown()
    log.info("done")
    return 0

