"""Looking at a federation: TensorBoard/MLflow logging, the HTML report, live status, console progress.

- :func:`observers_for` (rank 0, via ``hpcfl.report.Progress``): every metrics.jsonl
  record as scalars in ``runs/<name>/tb/`` (``observe.tensorboard``) and MLflow
  (``observe.mlflow``), without torch;
- :func:`write_report` (``hpcfl report``): one self-contained HTML file with plots;
- :func:`run_status` (``hpcfl status``): a local or SLURM run's progress and live ranks;
- :func:`progress_iter`: a tqdm bar on a terminal, plain lines in a log file.

Heavy packages (tensorboard, mlflow, matplotlib) are imported only by the function that needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def observers_for(cfg, run_dir: Path, start_round: int = 1, warn=None):
    from .sinks import observers_for as _f

    return _f(cfg, run_dir, start_round, warn)


def write_report(run_dir, *more_runs, output=None) -> Path:
    """Write the HTML report of one run (``runs/<name>/report.html``), or of several overlaid; return its path."""
    from .html import write_report as _f

    return _f([run_dir, *more_runs], output)


def run_status(run_dir: Path) -> Any:
    from .status import run_status as _f

    return _f(run_dir)


def progress_iter(items: Sequence, desc: str, unit: str, stream=None):
    from ..console import progress_iter as _f

    return _f(items, desc, unit, stream)


__all__ = ["observers_for", "write_report", "run_status", "progress_iter"]
