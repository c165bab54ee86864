"""Optional MLflow logging (``observe.mlflow``), through ``MlflowClient``: one MLflow run per hpcfl run.

Off by default and imported only when configured (``pip install mlflow-skinny``).
The default tracking URI is a local file store, ``<run.root>/mlruns``
(``mlflow ui --backend-store-uri runs/mlruns`` shows it); MLflow 3 refuses
file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is set, so hpcfl sets it for a
``file:`` URI it was given. The MLflow run id is kept in
``runs/<name>/mlflow.json``: a resumed hpcfl run continues its MLflow run.
Keys are the TensorBoard tags, a site's prefixed with ``sites/<site>/``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from ..errors import require
from ..rundir.paths import RunPaths
from .scalars import Scalar

INSTALL = "pip install mlflow-skinny (or set observe.mlflow: null)"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # ... and of params


def tracking_uri_for(uri: str, run_root: Path) -> str:
    return uri or (Path(run_root).resolve() / "mlruns").as_uri()


class MlflowLogger:
    def __init__(self, tracking_uri: str, experiment: str, run_dir: Path, run_name: str,
                 params: Optional[Dict[str, Any]] = None):
        if tracking_uri.startswith("file:") or "://" not in tracking_uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        require("mlflow", INSTALL)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.state_path = RunPaths(run_dir).mlflow_state
        self.run_id = self._resumed_run(tracking_uri)
        if self.run_id is None:
            run = self.client.create_run(exp_id, run_name=run_name, tags={"hpcfl.run_dir": str(Path(run_dir).resolve())})
            self.run_id = run.info.run_id
            self.state_path.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": self.run_id}) + "\n")
            flat = [Param(k, str(v)[:6000]) for k, v in _params(params or {})]
            for i in range(0, len(flat), PARAM_BATCH):
                self.client.log_batch(self.run_id, params=flat[i:i + PARAM_BATCH])
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _resumed_run(self, tracking_uri: str) -> Optional[str]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if state.get("tracking_uri") != tracking_uri:
            return None
        try:
            return self.client.get_run(state["run_id"]).info.run_id
        except Exception:  # noqa: BLE001 - a run deleted from the store: start a new one
            return None

    def write(self, step: int, scalars: Iterable[Scalar], wall_time: Optional[float] = None) -> None:
        from mlflow.entities import Metric

        ts = int(1000 * (time.time() if wall_time is None else wall_time))
        metrics = [Metric(f"{series}/{tag}" if series else tag, value, ts, int(step)) for series, tag, value in scalars]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def flush(self) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _params(cfg: Dict[str, Any]) -> Iterable[tuple]:
    """Config leaves as ``a.b.c`` -> value (lists and strings included: they are parameters too)."""
    def walk(d: Any, prefix: str):
        if isinstance(d, dict):
            for k, v in d.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            yield prefix, d
    yield from walk(cfg, "")

