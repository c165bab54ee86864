"""The run directory: everything a run leaves behind.

- :mod:`.paths`: every file name of a run (:class:`RunPaths`; the layout is listed there);
- :mod:`.lock`: one live run per directory (:class:`RunLock`, a context manager with a heartbeat);
- :mod:`.resume`: which checkpoint a launch continues from, or why it cannot;
- :mod:`.metrics`: the metrics log (``metrics.jsonl``);
- :class:`RunDir`: rank 0's run directory, made of the four.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..atomic import write_atomic
from ..config import Config, dump_yaml
from ..errors import CheckpointError
from .errors import RunDirBusy, RunDirError, warn
from .lock import LOCK_HEARTBEAT_S, LOCK_STALE_S, RunLock, lock_verdict, my_lock_record, pid_alive, proc_start
from .metrics import MetricsLog
from .paths import LOCK_NAME, RunPaths
from .resume import check_same_run, config_diff, fallback_line, latest_valid


class RunDir(RunPaths):
    """Rank 0's run directory: created or reopened by :meth:`prepare` (which takes the lock and checks the
    resume), written through :meth:`append_metrics` and :meth:`write_json`, given up by :meth:`close`
    (also ``with RunDir(cfg) as rundir:``)."""

    def __init__(self, cfg: Config):
        super().__init__(Path(cfg.run.root) / cfg.run.name)
        self.cfg = cfg
        self.lock = RunLock(self.path)
        self.metrics = MetricsLog(self.metrics_path)
        self.corrupt: List[Tuple[Path, str]] = []  # checkpoints passed over by the last check()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the lock ----------------------------------------------------------------
    def lock_state(self) -> Tuple[str, str, Dict[str, Any]]:
        """("free" | "mine" | "live" | "stale", why, the lock record)."""
        return self.lock.lock_state()

    def acquire_lock(self) -> None:
        self.lock.acquire_lock()

    def release_lock(self) -> None:
        self.lock.release_lock()

    # -- rank 0 only -------------------------------------------------------------
    def check(self, resume: bool = False, restart: bool = False) -> Optional[Dict[str, Any]]:
        """The checkpoint a launch would resume from, or an error saying why it cannot.

        Read-only: ``hpcfl launch`` calls it before starting any rank. A directory that a live run
        holds is refused (RunDirBusy, naming its host and pid). A directory with checkpoints is
        resumed from its newest valid one (corrupt newer ones are listed in ``self.corrupt``);
        one whose config differs in anything but rounds/paths/launch settings is refused,
        naming the keys that changed.
        """
        self.lock.refuse_if_busy()
        if restart:
            return None
        self.corrupt = []
        ckpt = latest_valid(self, self.corrupt)
        if resume and ckpt is None:
            raise CheckpointError(f"{self.path}: --resume given but there is no checkpoint to resume from")
        if ckpt is not None:
            check_same_run(self, self.cfg, ckpt)
        return ckpt

    def fallback_line(self, ckpt: Optional[Dict[str, Any]]) -> str:
        """The one warning line for corrupt checkpoints passed over by :meth:`check` ('' when none)."""
        return fallback_line(self, self.corrupt, ckpt)

    def prepare(self, resume: bool = False, restart: bool = False) -> Optional[Dict[str, Any]]:
        """Create or reopen the run directory, take its lock; return the checkpoint to resume from, if any.

        ``restart`` moves an existing run aside to ``<name>.old-<time>``: nothing is deleted.
        Corrupt newer checkpoints are reported in one warning line and renamed ``*.corrupt``."""
        if restart and self.path.exists():
            self.lock.refuse_if_busy()
            aside = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(self.path, aside)
            except OSError as exc:
                raise RunDirError(f"{self.path}: cannot move the old run aside: {exc.strerror or exc}") from None
            (aside / LOCK_NAME).unlink(missing_ok=True)
        self._mkdir(self.path)
        self.acquire_lock()
        try:
            ckpt = self.check(resume=resume)
            self._set_aside_corrupt(ckpt)
            self._mkdir(self.logs)
            self._mkdir(self.checkpoints)
            # a previous launch's errors, heartbeats and stack-dump request: the watchdog must judge this launch's
            # ranks, not a dead node's last beat, and no rank should dump its stack at its first beat
            for stale in [*self.error_files(), *self.beat_files(), self.dump_trigger]:
                stale.unlink(missing_ok=True)
            write_atomic(self.config, dump_yaml(self.cfg), error=RunDirError)
            self.metrics.trim(ckpt)
        except BaseException:
            self.release_lock()
            raise
        return ckpt

    def _set_aside_corrupt(self, ckpt: Optional[Dict[str, Any]]) -> None:
        line = self.fallback_line(ckpt)
        if line:
            warn(line)
            for p, _ in self.corrupt:
                os.replace(p, p.with_name(p.name + ".corrupt"))

    @staticmethod
    def _mkdir(d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{d}: cannot create the run directory: {exc.strerror or exc}") from None

    def append_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        self.metrics.append(records)

    def write_json(self, path: Path, obj: Any) -> None:
        """Write ``obj`` as JSON to ``path`` (one of this run's :class:`RunPaths`; a bare name is taken under it)."""
        write_atomic(self.path / path, json.dumps(obj, indent=2, default=str) + "\n", error=RunDirError)

    def close(self) -> None:
        self.metrics.close()
        self.release_lock()


__all__ = ["LOCK_HEARTBEAT_S", "LOCK_NAME", "LOCK_STALE_S", "MetricsLog", "RunDir", "RunDirBusy", "RunDirError",
           "RunLock", "RunPaths", "config_diff", "lock_verdict", "my_lock_record", "pid_alive", "proc_start", "warn"]
