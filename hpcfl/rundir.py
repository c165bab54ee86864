"""The run directory: everything a run leaves behind, in one place.

    runs/<name>/
      config.yaml        the resolved config (defaults + file + --set)
      manifest.json      per rank: host, role, site, pid, CPU affinity, GPU, versions; the data partition
      metrics.jsonl      one record per (round, site, split) and one summary per round
      summary.json       final metrics and where the time went (written at the end)
      run.lock           held by the live run's rank 0: host, pid, start time (a heartbeat keeps its mtime fresh)
      checkpoints/       round-NNNNNN.npz, atomic and checksummed (round-NNNNNN.npz.corrupt: set aside on resume)
      logs/rank-NNNN.log each rank's log; rank-NNNN.error.json if it failed
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import yaml

from .atomic import write_atomic
from .checkpoint import CorruptCheckpoint, list_checkpoints, load_checkpoint
from .config import Config, config_hash, dump_yaml, from_dict, trajectory_dict
from .errors import CheckpointError, HpcflError, LaunchError

LOCK_NAME = "run.lock"
LOCK_HEARTBEAT_S = 30.0  # rank 0 touches its lock this often
LOCK_STALE_S = 180.0  # a lock of another host untouched this long belongs to a dead run


class RunDirError(HpcflError):
    """The run directory cannot be created, read or written."""


class RunDirBusy(LaunchError):
    """Another live run holds the run directory."""


def warn(message: str) -> None:
    """One warning line on stderr (rank 0's log handlers are not installed yet when run directories are opened)."""
    sys.stderr.write(f"hpcfl: warning: {message}\n")
    sys.stderr.flush()


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


# -- the lock ---------------------------------------------------------------------


def _proc_start(pid: int) -> Optional[str]:
    """The start time of a process (clock ticks since boot) on Linux: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except (OSError, OverflowError, ValueError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")


def my_lock_record() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.time(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


def lock_verdict(lock: Dict[str, Any], age_s: float, me: Dict[str, Any],
                 alive: Callable[[int], bool] = pid_alive,
                 proc_start: Callable[[int], Optional[str]] = _proc_start,
                 stale_s: float = LOCK_STALE_S) -> Tuple[str, str]:
    """("mine" | "live" | "stale", why) for a lock record, its heartbeat age and this process. Pure but for the probes.

    Same host: stale when its pid is dead or now another process (start time differs).
    Another host: stale when its heartbeat is older than ``stale_s``, or when it is an earlier
    incarnation of this very SLURM job (a requeued job restarts after SLURM ended the old one)."""
    host, pid = lock.get("host"), lock.get("pid")
    if not isinstance(pid, int) or not isinstance(host, str):
        return "stale", "the lock file is unreadable"
    job = lock.get("slurm_job_id")
    if job and job == me.get("slurm_job_id") and str(lock.get("slurm_restart_count", "0")) != str(me.get("slurm_restart_count", "0")):
        return "stale", f"it was held by an earlier run of SLURM job {job}, which was requeued"
    if host == me["host"]:
        if not alive(pid):
            return "stale", f"pid {pid} on host {host} is gone"
        started = lock.get("proc_start")
        now_start = proc_start(pid)
        if started and now_start and started != now_start:
            return "stale", f"pid {pid} on host {host} is now another process"
        if pid == me["pid"]:
            return "mine", ""
        return "live", ""
    if age_s > stale_s:
        return "stale", f"its heartbeat from host {host} stopped {age_s:.0f}s ago"
    return "live", ""


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
        self.report = self.path / "report.html"
        self.stop_file = self.path / "stop-requested"
        self.lock_path = self.path / LOCK_NAME
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.debug = self.path / "debug"
        self.slurm = self.path / "slurm"
        self.tb = self.path / "tb"

    @classmethod
    def of(cls, cfg: Config) -> "RunPaths":
        return cls(Path(cfg.run.root) / cfg.run.name)

    def log_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.log"

    def error_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:04d}.error.json"

    def site_private(self, site: str, round_: int) -> Path:
        """A site's private entries (exclude_vars, state its task keeps) after ``round_``: resumed per site."""
        return self.checkpoints / f"site-{site}-private-round-{round_:06d}.npy"

    def local_weights(self, round_: int, rank: int) -> Path:
        """debug.save_local_weights: a rank's locally trained weights (``rank``: its virtual rank)."""
        return self.debug / f"round-{round_:06d}-rank-{rank:04d}.npy"


class RunDir(RunPaths):
    def __init__(self, cfg: Config):
        super().__init__(Path(cfg.run.root) / cfg.run.name)
        self.cfg = cfg
        self._metrics_file = None
        self._heartbeat: Optional[threading.Event] = None
        self.corrupt: List[Tuple[Path, str]] = []  # checkpoints passed over by the last check()

    # -- the lock ----------------------------------------------------------------
    def _read_lock(self) -> Optional[Tuple[Dict[str, Any], float]]:
        try:
            text = self.lock_path.read_bytes()
            age = time.time() - self.lock_path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunDirError(f"{self.lock_path}: cannot read the run's lock: {exc.strerror or exc}") from None
        try:
            lock = json.loads(text.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            lock = {}
        return (lock if isinstance(lock, dict) else {}), age

    def lock_state(self) -> Tuple[str, str, Dict[str, Any]]:
        """("free" | "mine" | "live" | "stale", why, the lock record)."""
        found = self._read_lock()
        if found is None:
            return "free", "", {}
        lock, age = found
        verdict, why = lock_verdict(lock, age, my_lock_record())
        return verdict, why, lock

    def _refuse_if_busy(self) -> Tuple[str, str, Dict[str, Any]]:
        state, why, lock = self.lock_state()
        if state == "live":
            raise RunDirBusy(f"{self.path} is in use by pid {lock['pid']} on host {lock['host']} (started "
                             f"{lock.get('started_at', '?')}); wait for it or stop it with hpcfl stop {self.path}")
        return state, why, lock

    def acquire_lock(self) -> None:
        """Hold the run directory for this process (rank 0): refuse a live holder, take over a stale one.

        A heartbeat thread keeps the lock's mtime fresh, which is how another host tells a live run from a dead one."""
        record = json.dumps(my_lock_record()).encode()
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                state, why, lock = self._refuse_if_busy()
                if state == "mine":
                    break
                if state == "stale":
                    warn(f"taking over the lock of {self.path}: {why}")
                    try:
                        self.lock_path.unlink()
                    except FileNotFoundError:
                        pass
                continue  # free again, or someone else took it: try to create it again
            except OSError as exc:
                raise RunDirError(f"{self.lock_path}: cannot create the run's lock: {exc.strerror or exc}") from None
            try:
                os.write(fd, record)
            finally:
                os.close(fd)
            break
        else:
            self._refuse_if_busy()
            raise RunDirBusy(f"{self.lock_path}: another process keeps taking this run directory's lock")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None:
            return
        stop = self._heartbeat = threading.Event()
        path = self.lock_path

        def beat() -> None:
            while not stop.wait(LOCK_HEARTBEAT_S):
                try:
                    os.utime(path)
                except OSError:
                    return  # the directory was moved or removed: nothing left to keep alive

        threading.Thread(target=beat, name="hpcfl-lock-heartbeat", daemon=True).start()

    def release_lock(self) -> None:
        """Give the run directory up (only a lock this process holds is removed)."""
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
        found = self._read_lock() if self.lock_path.parent.is_dir() else None
        if found is not None and found[0].get("pid") == os.getpid() and found[0].get("host") == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)

    # -- rank 0 only -------------------------------------------------------------
    def _latest_valid(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint that loads and verifies; corrupt newer ones are noted in ``self.corrupt``."""
        self.corrupt = []
        found = list_checkpoints(self.checkpoints)
        for p in reversed(found):
            try:
                ckpt = load_checkpoint(p)
            except CorruptCheckpoint as exc:
                self.corrupt.append((p, str(exc).split(": corrupt checkpoint ", 1)[-1]))
                continue
            ckpt["path"] = str(p)
            return ckpt
        if self.corrupt:
            names = ", ".join(p.name for p, _ in self.corrupt)
            raise CheckpointError(f"{self.checkpoints}: no valid checkpoint to resume from ({names}: "
                                  f"{self.corrupt[0][1]}); relaunch with --restart to start over (the old run is kept aside)")
        return None

    def _old_config(self) -> Optional[dict]:
        """The run's config.yaml as a dict, or None when it is missing or damaged (the checkpoint's hash decides then)."""
        old_path = self.path / "config.yaml"
        try:
            raw = yaml.safe_load(old_path.read_bytes().decode())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
            warn(f"{old_path} is unreadable; the checkpoint's config hash decides whether the run can resume")
            return None
        return raw if isinstance(raw, dict) else None

    def check(self, resume: bool = False, restart: bool = False) -> Optional[Dict[str, Any]]:
        """The checkpoint a launch would resume from, or an error saying why it cannot.

        Read-only: ``hpcfl launch`` calls it before starting any rank. A directory that a live run
        holds is refused (RunDirBusy, naming its host and pid). A directory with checkpoints is
        resumed from its newest valid one (corrupt newer ones are listed in ``self.corrupt``);
        one whose config differs in anything but rounds/paths/launch settings is refused,
        naming the keys that changed.
        """
        self._refuse_if_busy()
        if restart:
            return None
        ckpt = self._latest_valid()
        if resume and ckpt is None:
            raise CheckpointError(f"{self.path}: --resume given but there is no checkpoint to resume from")
        if ckpt is not None:
            want = config_hash(self.cfg)
            old_raw = self._old_config()
            try:  # re-read through today's schema: keys added since the run take their defaults
                have = config_hash(from_dict(old_raw, str(self.path / "config.yaml"))) if old_raw else ckpt.get("config_hash")
            except HpcflError:
                have = ckpt.get("config_hash")
            if have != want:
                diff = config_diff(trajectory_dict(old_raw), trajectory_dict(self.cfg)) if old_raw else ""
                raise CheckpointError(
                    f"{self.path} holds a run of a different config ({diff or 'hash ' + str(have)}); "
                    f"relaunch with --restart to start over (the old run is kept aside) or --set run.name=NEW"
                )
        return ckpt

    def fallback_line(self, ckpt: Optional[Dict[str, Any]]) -> str:
        """The one warning line for corrupt checkpoints passed over by :meth:`check` ('' when none)."""
        if not self.corrupt or ckpt is None:
            return ""
        bad = ", ".join(p.name for p, _ in self.corrupt)
        return (f"{self.checkpoints}/{bad} {'is' if len(self.corrupt) == 1 else 'are'} corrupt ({self.corrupt[0][1]}); "
                f"resuming from {Path(ckpt['path']).name} (round {ckpt['round']}); set aside as *.corrupt")

    def prepare(self, resume: bool = False, restart: bool = False) -> Optional[Dict[str, Any]]:
        """Create or reopen the run directory, take its lock; return the checkpoint to resume from, if any.

        ``restart`` moves an existing run aside to ``<name>.old-<time>``: nothing is deleted.
        Corrupt newer checkpoints are reported in one warning line and renamed ``*.corrupt``."""
        if restart and self.path.exists():
            self._refuse_if_busy()
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
            line = self.fallback_line(ckpt)
            if line:
                warn(line)
                for p, _ in self.corrupt:
                    os.replace(p, p.with_name(p.name + ".corrupt"))
            self._mkdir(self.logs)
            self._mkdir(self.checkpoints)
            # a previous launch's errors, heartbeats and stack-dump request: the watchdog must judge this launch's
            # ranks, not a dead node's last beat, and no rank should dump its stack at its first beat
            for stale in [*self.logs.glob("rank-*.error.json"), *self.logs.glob("rank-*.beat"),
                          self.logs / "dump-stacks"]:
                stale.unlink(missing_ok=True)
            write_atomic(self.path / "config.yaml", dump_yaml(self.cfg), error=RunDirError)
            self._trim_metrics(ckpt)
        except BaseException:
            self.release_lock()
            raise
        return ckpt

    @staticmethod
    def _mkdir(d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{d}: cannot create the run directory: {exc.strerror or exc}") from None

    def _trim_metrics(self, ckpt: Optional[Dict[str, Any]]) -> None:
        """Keep metrics of completed rounds only; restore the last round's from its checkpoint."""
        done = int(ckpt["round"]) if ckpt else 0
        kept: List[str] = []
        rounds_seen = set()
        try:
            lines = self.metrics_path.read_bytes().decode(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            raise RunDirError(f"{self.metrics_path}: cannot read: {exc.strerror or exc}") from None
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash, or damaged
            if not isinstance(rec, dict) or not isinstance(rec.get("round", 0), int):
                continue
            if rec.get("round", 0) <= done:
                kept.append(line)
                rounds_seen.add(rec.get("round"))
        if ckpt and done not in rounds_seen:
            kept.extend(json.dumps(r) for r in ckpt.get("records", []))
        write_atomic(self.metrics_path, "".join(k + "\n" for k in kept), error=RunDirError)

    def append_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a")
        self._metrics_file.write("".join(json.dumps(r) + "\n" for r in records))
        self._metrics_file.flush()

    def write_json(self, name: str, obj: Any) -> None:
        write_atomic(self.path / name, json.dumps(obj, indent=2, default=str) + "\n", error=RunDirError)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        self.release_lock()
