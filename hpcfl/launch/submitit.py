"""The Python API for clusters, through submitit: ``hpcfl.submit(...)`` returns a submitit Job.

On SLURM every submitit task is one rank (submitit's own srun, with the MPI
plugin of ``cluster.srun_mpi``), so ``hpcfl run``'s logic runs unchanged in each
task. Without SLURM (submitit's local executor) one task runs ``hpcfl launch``
(mpirun) on this machine. Preemption and timeouts use submitit's
checkpoint/requeue mechanism: the job is resubmitted as is and the federation
resumes after its last complete round from the run directory's checkpoints.

Graceful: submitit's own handler would requeue the moment the signal arrives,
losing the round in progress. We hold it back: on the signal, rank 0 (or the
mpirun task) asks the federation to stop after the round in progress (a stop
file in the run directory); once rank 0 has checkpointed that round and every
rank has exited cleanly, submitit's handler runs: checkpoint() and requeue.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from ..config import load_config
from ..errors import ConfigError, LaunchError, require
from ..rundir.paths import RunPaths


def _checkpointable():
    submitit = require("submitit", "pip install submitit")
    return submitit.helpers.Checkpointable


class FederationTask(_checkpointable()):
    """The callable submitit runs: one rank ("rank"), or the whole federation via mpirun ("launch")."""

    def __init__(self, config_path: str, overrides: Sequence[str], mode: str):
        self.config_path, self.overrides, self.mode = str(config_path), list(overrides), mode

    def __call__(self) -> Optional[Dict[str, Any]]:
        import signal

        import submitit

        from ..protocol.server import request_stop
        from ..rundir import RunPaths

        cfg = load_config(self.config_path, self.overrides)
        paths = RunPaths.of(cfg)
        try:
            env = submitit.JobEnvironment()
            sig, first = env._usr_sig(), env.global_rank == 0
        except RuntimeError:  # not under submitit (called directly)
            sig, first = None, True
        submitit_handler = signal.getsignal(sig) if sig is not None else None
        got: Dict[str, Any] = {}

        def on_signal(signum: int, frame: Any) -> None:
            got["signum"] = signum
            if first:
                request_stop(signum)  # rank 0 in this process ("rank" mode) ...
                paths.stop_file.touch()  # ... or in mpirun's children ("launch" mode)

        if callable(submitit_handler):
            signal.signal(sig, on_signal)
        if self.mode == "rank":
            from ..runtime import run_rank

            run_rank(self.config_path, self.overrides)
        else:
            from .local import launch

            rc = launch(cfg, self.config_path, self.overrides)
            if rc != 0:
                raise LaunchError(f"the federation failed (exit code {rc}); see {paths.logs}")
        summary_path = paths.summary
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if got and first and callable(submitit_handler) and summary and "stopped_after_round" in summary:
            submitit_handler(got["signum"], None)  # submitit: checkpoint(), requeue, exit
        return summary
    # checkpoint(): submitit's Checkpointable resubmits this same call; the run directory resumes it.


def submit(config_path: str, overrides: Sequence[str] = (), executor: str = "auto",
           folder: Optional[str] = None):
    """Submit a federation with submitit; returns the submitit Job (``job.result()`` is rank 0's summary
    on the local executor, and each task's return value on SLURM: use ``job.results()[0]``).

    executor: "auto" (SLURM where sbatch exists, else local), "slurm" or "local".
    """
    submitit = require("submitit", "pip install submitit")
    cfg = load_config(config_path, overrides)
    folder = folder or str(RunPaths.of(cfg).submitit)
    ex = submitit.AutoExecutor(folder=folder, cluster=None if executor == "auto" else executor)
    c = cfg.cluster
    if ex.cluster == "slurm":
        n = cfg.world_size
        if n % c.nodes:
            raise ConfigError(f"cluster.nodes: submitit puts the same number of ranks on every node, and {n} ranks do "
                              f"not divide over {c.nodes} nodes; use `hpcfl submit` for uneven placements")
        extra: Dict[str, Any] = {"comment": f"hpcfl:{cfg.run.root}/{cfg.run.name}"}
        if c.oversubscribe:
            extra["overcommit"] = True
        if c.account:
            extra["account"] = c.account
        if c.qos:
            extra["qos"] = c.qos
        h, m, s = (list(map(int, c.time_limit.split("-")[-1].split(":"))) + [0, 0])[:3]
        days = int(c.time_limit.split("-")[0]) if "-" in c.time_limit else 0
        ex.update_parameters(
            name=f"hpcfl-{cfg.run.name}", nodes=c.nodes, tasks_per_node=n // c.nodes,
            timeout_min=days * 1440 + h * 60 + m + (1 if s else 0),
            slurm_partition=c.partition or None, slurm_gpus_per_node=c.gpus_per_node or None,
            slurm_srun_args=[f"--mpi={c.srun_mpi}"], slurm_additional_parameters=extra,
            slurm_setup=[*(f"module load {x}" for x in c.modules), *c.setup],
        )
        task = FederationTask(config_path, overrides, "rank")
    else:
        ex.update_parameters(name=f"hpcfl-{cfg.run.name}", timeout_min=24 * 60)
        task = FederationTask(config_path, overrides, "launch")
    return ex.submit(task)
