"""Rank 0's observers: every round's records, as scalars, to TensorBoard and (optionally) MLflow.

Made from ``cfg.observe`` by :func:`observers_for`; fed by ``hpcfl.report.Progress``.
A sink that fails in the middle of a run (a full disk, an MLflow server gone)
is dropped with one line on the console: the federation matters more than its
charts. A sink that cannot start (its package missing) fails the run at start
with one line saying what to install.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from ..rundir.paths import RunPaths
from .scalars import cross_site_scalars, record_scalars



class Observers:
    def __init__(self, sinks: Dict[str, Any], warn: Optional[Callable[[str], None]] = None):
        self.sinks = dict(sinks)
        self.warn = warn or (lambda line: None)
        self.last_round: Optional[int] = None

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                call(sink)
            except Exception as exc:  # noqa: BLE001 - see the module docstring
                self.warn(f"hpcfl: {name}: {what} failed, no more {name} logging for this run: {exc}")
                self.sinks.pop(name, None)

    def records(self, records: Iterable[Dict[str, Any]]) -> None:
        """Write the scalars of metrics.jsonl records (usually one round's), one step per round."""
        by_round: Dict[int, List[Dict[str, Any]]] = {}
        for rec in records:
            if "round" in rec:
                by_round.setdefault(int(rec["round"]), []).append(rec)
        for step, recs in sorted(by_round.items()):
            scalars = [s for rec in recs for s in record_scalars(rec)]
            wall = next((r.get("timestamp") for r in recs if r.get("kind") == "round" and r.get("timestamp")), None)
            self._each("writing", lambda sink: sink.write(step, scalars, wall))
            self.last_round = step
        self._each("flushing", lambda sink: sink.flush())

    def finish(self, run_dir: Optional[Path] = None, status: str = "FINISHED") -> None:
        """cross_site.json (if the run wrote one) at the last round's step, then close every sink."""
        doc = _read_json(RunPaths(run_dir).cross_site) if run_dir is not None else None
        if doc and self.last_round is not None:
            scalars = cross_site_scalars(doc)
            self._each("writing", lambda sink: sink.write(self.last_round, scalars, None))
        for name, sink in list(self.sinks.items()):
            try:
                sink.close(status) if name == "mlflow" else sink.close()
            except Exception as exc:  # noqa: BLE001
                self.warn(f"hpcfl: {name}: closing failed: {exc}")
        self.sinks.clear()


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def observers_for(cfg, run_dir: Path, start_round: int = 1, warn: Optional[Callable[[str], None]] = None) -> Observers:
    """The sinks ``cfg.observe`` asks for, writing under ``run_dir``."""
    from ..config import to_dict

    obs = cfg.observe
    sinks: Dict[str, Any] = {}
    if obs.tensorboard:
        from .tensorboard import TensorBoardWriter

        sinks["tensorboard"] = TensorBoardWriter(RunPaths(run_dir).tb, start_round)
    if obs.mlflow is not None:
        from .mlflow_log import MlflowLogger, tracking_uri_for

        uri = tracking_uri_for(obs.mlflow.tracking_uri, Path(cfg.run.root))
        sinks["mlflow"] = MlflowLogger(uri, obs.mlflow.experiment, Path(run_dir), cfg.run.name, params=to_dict(cfg))
    return Observers(sinks, warn)
