"""The run directory: everything a run leaves behind, in one place.

    runs/<name>/
      config.yaml        the resolved config (defaults + file + --set)
      manifest.json      per rank: host, role, site, pid, CPU affinity, GPU, versions; the data partition
      metrics.jsonl      one record per (round, site, split) and one summary per round
      summary.json       final metrics and where the time went (written at the end)
      checkpoints/       round-NNNNNN.pt, atomic
      logs/rank-NNNN.log each rank's log; rank-NNNN.error.json if it failed
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import Config, config_hash, dump_yaml, from_dict, trajectory_dict
from .errors import CheckpointError, HpcflError


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and any(isinstance(v, dict) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def config_diff(old: dict, new: dict, limit: int = 4) -> str:
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


class RunDir:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.path = Path(cfg.run.root) / cfg.run.name
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.metrics_path = self.path / "metrics.jsonl"
        self._metrics_file = None

    def log_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.log"

    def error_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.error.json"

    # -- rank 0 only -------------------------------------------------------------
    def check(self, resume: bool = False, restart: bool = False) -> Optional[Dict[str, Any]]:
        """The checkpoint a launch would resume from, or a CheckpointError saying why it cannot.

        Read-only: ``hpcfl launch`` calls it before starting any rank.
        A directory with checkpoints is resumed; one whose config differs in
        anything but rounds/paths/launch settings is refused, naming the keys
        that changed.
        """
        if restart:
            return None
        ckpt_path = latest_checkpoint(self.checkpoints)
        if resume and ckpt_path is None:
            raise CheckpointError(f"{self.path}: --resume given but there is no checkpoint to resume from")
        ckpt = None
        if ckpt_path is not None:
            ckpt = load_checkpoint(ckpt_path)
            want = config_hash(self.cfg)
            old_path = self.path / "config.yaml"
            old_raw = yaml.safe_load(old_path.read_text()) if old_path.exists() else None
            try:  # re-read through today's schema: keys added since the run take their defaults
                have = config_hash(from_dict(old_raw, str(old_path))) if old_raw else ckpt.get("config_hash")
            except HpcflError:
                have = ckpt.get("config_hash")
            if have != want:
                diff = config_diff(trajectory_dict(old_raw), trajectory_dict(self.cfg)) if old_raw else ""
                raise CheckpointError(
                    f"{self.path} holds a run of a different config ({diff or 'hash ' + str(have)}); "
                    f"relaunch with --restart to start over (the old run is kept aside) or --set run.name=NEW"
                )
        return ckpt

    def prepare(self, resume: bool = False, restart: bool = False) -> Optional[Dict[str, Any]]:
        """Create or reopen the run directory; return the checkpoint to resume from, if any.
        ``restart`` moves an existing run aside to ``<name>.old-<time>``: nothing is deleted."""
        if restart and self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
        ckpt = self.check(resume=resume)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in self.logs.glob("rank-*.error.json"):
            stale.unlink()
        write_atomic(self.path / "config.yaml", dump_yaml(self.cfg))
        self._trim_metrics(ckpt)
        return ckpt

    def _trim_metrics(self, ckpt: Optional[Dict[str, Any]]) -> None:
        """Keep metrics of completed rounds only; restore the last round's from its checkpoint."""
        done = int(ckpt["round"]) if ckpt else 0
        kept: List[str] = []
        rounds_seen = set()
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("round", 0) <= done:
                    kept.append(line)
                    rounds_seen.add(rec.get("round"))
        if ckpt and done not in rounds_seen:
            kept.extend(json.dumps(r) for r in ckpt.get("records", []))
        write_atomic(self.metrics_path, "".join(k + "\n" for k in kept))

    def append_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a")
        self._metrics_file.write("".join(json.dumps(r) + "\n" for r in records))
        self._metrics_file.flush()

    def write_json(self, name: str, obj: Any) -> None:
        write_atomic(self.path / name, json.dumps(obj, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
