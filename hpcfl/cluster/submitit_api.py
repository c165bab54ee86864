"""The Python API for clusters, through submitit: ``hpcfl.submit(...)`` returns a submitit Job.

On SLURM every submitit task is one rank (submitit's own srun, with the MPI
plugin of ``cluster.srun_mpi``), so ``hpcfl run``'s logic runs unchanged in each
task. Without SLURM (submitit's local executor) one task runs ``hpcfl launch``
(mpirun) on this machine. Preemption and timeouts use submitit's
checkpoint/requeue mechanism: the job is resubmitted as is and the federation
resumes after its last complete round from the run directory's checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..config import load_config
from ..errors import ConfigError, LaunchError, require


def _checkpointable():
    submitit = require("submitit", "pip install submitit")
    return submitit.helpers.Checkpointable


class FederationTask(_checkpointable()):
    """The callable submitit runs: one rank ("rank"), or the whole federation via mpirun ("launch")."""

    def __init__(self, config_path: str, overrides: Sequence[str], mode: str):
        self.config_path, self.overrides, self.mode = str(config_path), list(overrides), mode

    def __call__(self) -> Optional[Dict[str, Any]]:
        cfg = load_config(self.config_path, self.overrides)
        if self.mode == "rank":
            from ..runtime import run_rank

            run_rank(self.config_path, self.overrides)
        else:
            from ..launch import launch

            rc = launch(cfg, self.config_path, self.overrides)
            if rc != 0:
                raise LaunchError(f"the federation failed (exit code {rc}); see {cfg.run.root}/{cfg.run.name}/logs")
        summary = Path(cfg.run.root) / cfg.run.name / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else None
    # checkpoint(): submitit's Checkpointable resubmits this same call; the run directory resumes it.


def submit(config_path: str, overrides: Sequence[str] = (), executor: str = "auto",
           folder: Optional[str] = None):
    """Submit a federation with submitit; returns the submitit Job (``job.result()`` is rank 0's summary
    on the local executor, and each task's return value on SLURM: use ``job.results()[0]``).

    executor: "auto" (SLURM where sbatch exists, else local), "slurm" or "local".
    """
    submitit = require("submitit", "pip install submitit")
    cfg = load_config(config_path, overrides)
    folder = folder or str(Path(cfg.run.root) / cfg.run.name / "submitit")
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
