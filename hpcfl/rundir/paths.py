"""Every file name of a run directory, in one place (no I/O here).

    runs/<name>/
      config.yaml          the resolved config (defaults + file + --set)
      launch-config.yaml   a config launched from Python (not a file), for the ranks to read
      manifest.json        per rank: host, role, site, pid, CPU affinity, GPU, versions; the data partition
      metrics.jsonl        one record per (round, site, split) and one summary per round
      summary.json         final metrics and where the time went (written at the end)
      cross_site.json      every site's final local model and the global model on every site's validation data
      best.npz             the global model with the best eval.best_metric
      report.html          `hpcfl report`
      stop-requested       `hpcfl stop` (or SLURM's warning signal): checkpoint after this round and stop
      run.lock             held by the live run's rank 0: host, pid, start time (a heartbeat keeps its mtime fresh)
      mlflow.json          the MLflow run a resumed run continues
      checkpoints/         round-NNNNNN.npz, atomic and checksummed (round-NNNNNN.npz.corrupt: set aside on resume);
                           site-<site>-private-round-NNNNNN.npy: a site's entries that are never sent
      logs/                rank-NNNN.log each rank's log; rank-NNNN.error.json if it failed; rank-NNNN.beat
      attention/           task mil: the final model's attention per tile of each site's validation slides
      tb/                  TensorBoard event files
      debug/               debug.save_local_weights
      slurm/               jobs.json (the jobs `hpcfl submit` recorded), <job id>.out
      submitit/            hpcfl.submit's submitit folder

Code elsewhere reaches a run's files through :class:`RunPaths`, never by writing a name itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..checkpoint import checkpoint_path

if TYPE_CHECKING:
    from ..config import Config

LOCK_NAME = "run.lock"
ERROR_GLOB = "rank-*.error.json"  # every rank's error record under logs/
BEAT_GLOB = "rank-*.beat"  # every rank's heartbeat under logs/
ATTENTION_DIR = "attention"
TB_DIR = "tb"
REPORT_NAME = "report.html"
# The files a run directory is recognised by (``hpcfl status``/``report`` on a directory holding none is refused).
READ_FILES = ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "cross_site.json")


class RunPaths:
    """Where everything of a run directory lives: the one place that names its files (no I/O here)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.launch_config = self.path / "launch-config.yaml"  # a config launched from Python, for the ranks
        self.manifest = self.path / "manifest.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.cross_site = self.path / "cross_site.json"
        self.best = self.path / "best.npz"
        self.report = self.path / REPORT_NAME
        self.stop_file = self.path / "stop-requested"
        self.lock_path = self.path / LOCK_NAME
        self.mlflow_state = self.path / "mlflow.json"
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.dump_trigger = self.logs / "dump-stacks"  # the watchdog asks every rank for its stack
        self.attention = self.path / ATTENTION_DIR
        self.debug = self.path / "debug"
        self.slurm = self.path / "slurm"
        self.slurm_jobs = self.slurm / "jobs.json"
        self.submitit = self.path / "submitit"
        self.tb = self.path / TB_DIR

    @classmethod
    def of(cls, cfg: "Config") -> "RunPaths":
        return cls(Path(cfg.run.root) / cfg.run.name)

    def log_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.log"

    def error_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.error.json"

    def beat_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.beat"

    def error_files(self) -> list:
        """Every rank's error record of this launch (a launch removes older ones)."""
        return sorted(self.logs.glob(ERROR_GLOB))

    def beat_files(self) -> list:
        """Every rank's heartbeat file (a launch removes the previous launch's)."""
        return sorted(self.logs.glob(BEAT_GLOB))

    def checkpoint(self, round_: int) -> Path:
        return checkpoint_path(self.checkpoints, round_)

    def site_private(self, site: str, round_: int) -> Path:
        """A site's private entries (exclude_vars, state its task keeps) after ``round_``: resumed per site."""
        return self.checkpoints / f"site-{site}-private-round-{round_:06d}.npy"

    def local_weights(self, round_: int, rank: int) -> Path:
        """debug.save_local_weights: a rank's locally trained weights (``rank``: its virtual rank)."""
        return self.debug / f"round-{round_:06d}-rank-{rank:04d}.npy"

    def upload(self, round_: int, site_index: int) -> Path:
        """debug.save_local_weights: what a site uploaded (after its privacy filters)."""
        return self.debug / f"upload-round-{round_:06d}-site-{site_index}.npy"

    def slurm_log(self, job_id: str) -> Path:
        return self.slurm / f"{job_id}.out"


__all__ = ["ATTENTION_DIR", "BEAT_GLOB", "ERROR_GLOB", "LOCK_NAME", "READ_FILES", "REPORT_NAME", "RunPaths", "TB_DIR"]
