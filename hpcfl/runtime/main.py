"""The rank's main (``hpcfl run``): start up, then rank 0 aggregates and the other ranks train their slot's sites,
then everyone ends together; any failure goes through the failure contract (:mod:`.failure`)."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

from ..config import Config
from .failure import fail
from .startup import (RankLaunch, StartedRank, build_slot, install_stop_handler, legacy_pin, plain, prepare,
                      rank_info, start_rank)

log = logging.getLogger("hpcfl")


def run_rank(config_path: str, overrides: Sequence[str] = (), resume: bool = False, restart: bool = False,
             pin: Optional[str] = None) -> int:
    """Entry point of one rank. Returns 0, or ends the whole MPI job on failure."""
    from ..comm import own_session

    own_session()  # before MPI starts: hpcfl launch gives each rank its own scheduling group, as torchrun does
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    state: Dict[str, Any] = {"role": None, "rundir": None, "round": None, "started": False, "beat": None}
    launch = RankLaunch(resume=resume, restart=restart, pin=pin or legacy_pin())
    try:
        return _run(world, config_path, overrides, launch, state)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job, not hang it
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        fail(world, rank, exc, state)
        return 1  # not reached: Abort does not return


def _run(world, config_path: str, overrides: Sequence[str], launch: RankLaunch, state: Dict[str, Any]) -> int:
    from ..comm import quiet_barrier

    rank = world.Get_rank()
    install_stop_handler(rank)
    prepared = prepare(world, config_path, overrides, launch, state)
    if prepared is None:
        return 1  # rank 0 reports it and ends the job
    cfg, start_round, ckpt, rundir = prepared
    r = start_rank(world, cfg, rundir, launch, state)
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
        worker, device, backend, partition = build_slot(cfg, r.topology, r.role, r.comms, rundir, start_round,
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


def _aggregate(cfg: Config, r: StartedRank, rundir, ckpt, start_round: int, infos) -> None:
    """Rank 0: the manifest, then the federation's rounds, then the summary."""
    from ..protocol.server import Aggregator
    from ..report import Progress
    from ..topology import listed

    topology, names = r.topology, r.topology.names
    part = next((p for _, p in infos if p is not None), None)
    rundir.write_json(rundir.manifest, {
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
    rundir.write_json(rundir.summary, summary)
    rundir.close()
