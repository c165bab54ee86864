"""The run directory's lock: one live run per directory, across hosts.

Rank 0 holds ``run.lock`` (host, pid, process start time, SLURM job) for the whole run; a heartbeat thread
keeps its mtime fresh, which is how another host tells a live run from a dead one. :class:`RunLock` is a
context manager (``with RunLock(path):``); :func:`lock_verdict` is the pure decision.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .errors import RunDirBusy, RunDirError, warn
from .paths import LOCK_NAME

LOCK_HEARTBEAT_S = 30.0  # rank 0 touches its lock this often
LOCK_STALE_S = 180.0  # a lock of another host untouched this long belongs to a dead run


def proc_start(pid: int) -> Optional[str]:
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
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": proc_start(os.getpid()),
            "started": time.time(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


def lock_verdict(lock: Dict[str, Any], age_s: float, me: Dict[str, Any],
                 alive: Callable[[int], bool] = pid_alive,
                 proc_start: Callable[[int], Optional[str]] = proc_start,
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


class RunLock:
    """The lock of run directory ``path``: held by at most one live process (rank 0 of the run)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_NAME
        self._heartbeat: Optional[threading.Event] = None

    def __enter__(self) -> "RunLock":
        self.acquire_lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release_lock()

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

    def refuse_if_busy(self) -> Tuple[str, str, Dict[str, Any]]:
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
                state, why, lock = self.refuse_if_busy()
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
            self.refuse_if_busy()
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


__all__ = ["LOCK_HEARTBEAT_S", "LOCK_STALE_S", "RunLock", "lock_verdict", "my_lock_record", "pid_alive", "proc_start"]
