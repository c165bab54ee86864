"""Hung ranks end the job: heartbeats, a watchdog, and everyone's Python stack in their log.

Every rank runs a :class:`Heartbeat` thread that rewrites its beat file (``RunPaths.beat_path``)
(JSON: phase, round, site, a progress counter and when it last moved) every
``interval`` seconds; the main thread moves the counter at every training step
and phase change. The thread keeps beating while the main thread waits in MPI,
so:

* a beat file that stops changing means the process is stopped or frozen
  (SIGSTOP, a node in trouble, a C call holding the GIL);
* a beat that goes on while the progress counter stands still, outside the
  phases where a rank legitimately waits for others, means the rank is stuck.

Rank 0's :class:`Watchdog` reads every rank's beat (slot leaders read rank 0's).
When a rank makes no progress for ``fault.hang_timeout_s`` (default:
:func:`auto_timeout`: ``fault.hang_floor_s`` through start-up and the first
round, then five times the slowest round measured after the first, at least
``fault.hang_min_s``), it names the rank,
its site and the phase it is stuck in, in one line, asks every rank to write its
Python stack to its log (faulthandler, through a trigger file every heartbeat
thread looks for: ``RunPaths.dump_trigger``), records the error for ``hpcfl launch``'s failure line, and
ends the job with MPI_Abort.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .rundir.paths import RunPaths

log = logging.getLogger("hpcfl")

# A heartbeat thread writes every 2 s: silent this long, the process is stopped or frozen.
FROZEN_S = 6.0
# Phases that keep the long floor (fault.hang_floor_s) whatever the rounds took: start-up (imports, data),
# and the end's cross-site evaluation (every site's model on every site's data, in one phase).
LONG_PHASES = ("start-up", "cross-site evaluation")
# A watchdog poll this much later than its interval means the watcher itself did not run (the machine stalled:
# swap, I/O, a paused VM, far more runnable processes than cores); that time is not counted against any rank.
LATE_S = 5.0
# Phases in which a rank waits for others: no progress there is not its fault.
WAITING = ("wait for uploads", "wait for evaluations", "upload", "receive global model", "report evaluations",
           "wait for the next plan", "start-up barrier", "done")


def read_beat(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class Heartbeat:
    """This rank's progress, written to its beat file by a daemon thread every ``interval`` seconds."""

    def __init__(self, paths: RunPaths, rank: int, describe: str = "", interval: float = 2.0, log_file: Any = None):
        self.paths, self.rank, self.describe, self.interval = paths, rank, describe, interval
        self.path = paths.beat_path(rank)
        self.state: Dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                                      "who": describe, "phase": "start-up", "round": 0, "site": None}
        self.progress = 0
        self.progress_time = time.time()
        self.log_file = log_file
        self._stop = threading.Event()
        self._dumped = False
        self.slowest_round_s = 0.0
        self.round_times: List[float] = []  # this launch's rounds, in order (the watchdog's timeout follows them)
        self._thread = threading.Thread(target=self._run, name="hpcfl-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._write()
        self._thread.start()
        return self

    def tick(self) -> None:
        """Progress: a training step, a chunk, anything that shows the rank is not stuck."""
        self.progress += 1
        self.progress_time = time.time()

    def phase(self, what: str, round_: int = 0, site: Optional[str] = None) -> None:
        self.state.update(phase=what, round=round_, site=site)
        self.tick()

    def round_done(self, round_: int, seconds: float) -> None:
        self.slowest_round_s = max(self.slowest_round_s, seconds)
        self.round_times.append(float(seconds))
        self.state["slowest_round_s"] = self.slowest_round_s
        self.tick()

    def _write(self) -> None:
        rec = dict(self.state, progress=self.progress, progress_time=self.progress_time, time=time.time())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.path)
        except OSError:  # a full disk must not kill the rank: the watchdog then sees a stale beat
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            if not self._dumped and self.paths.dump_trigger.exists():
                self._dumped = True
                self.dump_stacks("the watchdog asked for it")

    def dump_stacks(self, why: str) -> None:
        f = self.log_file
        if f is None:
            return
        try:
            f.write(f"\n--- Python stacks of rank {self.rank} ({why}) ---\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
        except (OSError, ValueError):
            pass

    def stop(self, phase: str = "done") -> None:
        self.state["phase"] = phase
        self._stop.set()
        self._write()


def verdict(beats: Dict[int, Optional[Dict[str, Any]]], now: float, timeout: float,
            started: Dict[int, float], startup_timeout: Optional[float] = None,
            stale_only: bool = False, own_host: Optional[str] = None) -> Optional[str]:
    """Pure: why the job is hung, or None. ``beats``: rank -> its last beat (None if never seen);
    ``started``: rank -> when the watchdog started expecting it. Ranks still starting up (importing
    torch, loading data: seconds to minutes on a loaded node) get ``startup_timeout`` instead.
    ``stale_only``: judge only whether processes are alive (a slot leader watching rank 0).
    ``own_host``: the watcher's node; another node whose every rank stopped beating is named as lost."""
    startup_timeout = max(timeout, startup_timeout or timeout)
    stale, stuck, waiting = [], [], []
    for rank, b in sorted(beats.items()):
        if b is None:
            if now - started.get(rank, now) > startup_timeout:
                stale.append((rank, None, now - started[rank]))
            continue
        phase = str(b.get("phase"))
        if phase in ("done", "failed"):
            continue
        limit = startup_timeout if phase.startswith(LONG_PHASES) else timeout
        if now - float(b.get("time", now)) > limit:
            stale.append((rank, b, now - float(b["time"])))
        elif not stale_only and now - float(b.get("progress_time", now)) > limit:
            (waiting if phase in WAITING else stuck).append((rank, b, now - float(b["progress_time"])))
    if (stuck or waiting) and not stale:
        from .reach import unreachable_node

        cut = unreachable_node(beats, now, timeout, own_host)  # ranks alive, but their node is cut off
        if cut is not None:
            return cut
        # a rank stuck in a collective is usually the symptom; a process whose heartbeat has stopped
        # beating (a few intervals) is the cause, even before its own timeout runs out
        frozen = [(r, b, now - float(b["time"])) for r, b in sorted(beats.items())
                  if b is not None and str(b.get("phase")) not in ("done", "failed")
                  and now - float(b.get("time", now)) > FROZEN_S]
        stale = frozen
    if stale:
        lost = lost_node(beats, stale, own_host, now)
        if lost is not None:
            return lost
        rank, b, age = stale[0]
        if b is None:
            return f"rank {rank} never started its heartbeat in {age:.0f}s (it may be stuck starting up)"
        idle = now - float(b.get("progress_time", b["time"]))
        return (f"{_who(b, rank)} made no progress for {idle:.0f}s and its heartbeat stopped {age:.0f}s ago: the "
                f"process is stopped or frozen (phase: {_where(b)})")
    if stuck:
        rank, b, age = max(stuck, key=lambda x: x[2])
        return f"{_who(b, rank)} made no progress for {age:.0f}s (phase: {_where(b)})"
    if waiting and len(waiting) == len([b for b in beats.values() if b is not None and b.get("phase") != "done"]):
        rank, b, age = max(waiting, key=lambda x: x[2])
        return f"every rank has been waiting for {age:.0f}s (e.g. {_who(b, rank)}, phase: {_where(b)}): a deadlock"
    return None


def lost_node(beats: Dict[int, Optional[Dict[str, Any]]], stale, own_host: Optional[str],
              now: float) -> Optional[str]:
    """Pure: "node X is lost or unreachable ..." when a rank of another node than ``own_host`` is past its
    timeout and every watched rank of that node (two or more) has stopped beating too (silent for over
    FROZEN_S: they write every 2 s, so they stopped within seconds of each other): one line naming the
    node, its ranks and their sites."""
    import re

    by_host: Dict[str, list] = {}
    for r, b in beats.items():
        if b is not None and str(b.get("phase")) not in ("done", "failed") and b.get("host"):
            by_host.setdefault(str(b["host"]), []).append(r)
    past = {r for r, b, _ in stale if b is not None}
    gone = {r for r, b in beats.items() if b is not None and now - float(b.get("time", now)) > FROZEN_S}
    for host, ranks in sorted(by_host.items()):
        if host == own_host or len(ranks) < 2 or not set(ranks) <= gone or not set(ranks) & past:
            continue
        who = [str(beats[r].get("who") or "") for r in sorted(ranks)]  # type: ignore[union-attr]
        sites = list(dict.fromkeys(m for w in who for m in re.findall(r"'([^']+)'", w)))
        age = max(now - float(beats[r]["time"]) for r in ranks)  # type: ignore[index]
        return (f"node {host} is lost or unreachable: its ranks {', '.join(map(str, sorted(ranks)))}"
                + (f" (site{'s' if len(sites) > 1 else ''} {', '.join(sites)})" if sites else "")
                + f" all stopped beating {age:.0f}s ago")
    return None


def excuse(beats: Dict[int, Optional[Dict[str, Any]]], stalls: Sequence[tuple],
           now: float) -> Dict[int, Optional[Dict[str, Any]]]:
    """Pure: ``beats`` with each rank's times (last beat, last progress, last reach of rank 0) moved forward by
    the part of the watcher's ``stalls`` ((start, end) wall times) that came after them: no rank is judged on
    time in which nobody could watch it. A real hang is still found, later by the length of the stall."""
    if not stalls:
        return beats
    out: Dict[int, Optional[Dict[str, Any]]] = {}
    for r, b in beats.items():
        if b is not None:
            b = dict(b)
            for key in ("time", "progress_time", "reached_rank0"):
                if isinstance(b.get(key), (int, float)):
                    t = float(b[key])
                    b[key] = t + sum(max(0.0, min(e, now) - max(s, t)) for s, e in stalls)
        out[r] = b
    return out


def auto_timeout(round_times: Sequence[float], floor_s: float, min_s: float, factor: float = 5.0) -> float:
    """Pure: the automatic hang timeout after ``round_times`` (this launch's rounds, in order).

    Start-up and the first round are slow and unknown (imports, first batches, warm-up): ``floor_s``
    (and ``factor`` x the first round, if longer). Once a round after the first has been measured,
    ``factor`` x the slowest of those, at least ``min_s``: a rank stopped in a job of 0.2 s rounds is
    then found after ``min_s`` (60 s by default), not after the 300 s floor."""
    later = list(round_times[1:])
    if not later:
        return max(floor_s, factor * max(round_times, default=0.0))
    return max(min_s, factor * max(later))


def _who(b: Dict[str, Any], rank: int) -> str:
    return b.get("who") or f"rank {rank}"


def _where(b: Dict[str, Any]) -> str:
    parts = [str(b.get("phase"))]
    if b.get("round"):
        parts.append(f"round {b['round']}")
    if b.get("site"):
        parts.append(f"site {b['site']!r}")
    return ", ".join(parts)


class Watchdog:
    """Watches ``ranks``' beat files; on a hang calls ``on_hang(line, beats)`` once."""

    def __init__(self, paths: RunPaths, ranks: Iterable[int], timeout_s: Optional[float], floor_s: float,
                 on_hang: Callable[[str, Dict[int, Any]], None], own: Optional[Heartbeat] = None,
                 poll_s: float = 1.0, stale_only: bool = False, min_s: Optional[float] = None):
        self.paths, self.ranks, self.stale_only = paths, list(ranks), stale_only
        self.timeout_s, self.floor_s, self.on_hang, self.own, self.poll_s = timeout_s, floor_s, on_hang, own, poll_s
        self.min_s = floor_s if min_s is None else min_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcfl-watchdog", daemon=True)

    def timeout(self) -> float:
        if self.timeout_s is not None:
            return float(self.timeout_s)
        return auto_timeout(self.own.round_times if self.own is not None else [], self.floor_s, self.min_s)

    def start(self) -> "Watchdog":
        self._started = {r: time.time() for r in self.ranks}
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last, stalls = time.monotonic(), []
        while not self._stop.wait(self.poll_s):
            mono, now = time.monotonic(), time.time()
            late, last = mono - last - self.poll_s, mono
            if late > LATE_S:
                stalls = [x for x in stalls if x[1] > now - 3600] + [(now - late, now)]
                log.info("the watchdog itself did not run for %.0fs (the machine stalled): not counted against "
                         "any rank", late)
            beats = excuse({r: read_beat(self.paths.beat_path(r)) for r in self.ranks}, stalls, now)
            line = verdict(beats, now, self.timeout(), self._started, startup_timeout=self.floor_s,
                           stale_only=self.stale_only, own_host=socket.gethostname())
            if line is not None and not self._stop.is_set():
                self.on_hang(line, beats)
                return


def end_job_on_hang(rundir: RunPaths, world, own: Heartbeat, grace_s: float = 3.0) -> Callable[[str, Dict[int, Any]], None]:
    """The action of a hang: one line, every rank's stack in its log, an error record, MPI_Abort."""

    def act(line: str, beats: Dict[int, Any]) -> None:
        msg = f"hpcfl: {line}; ending the job (fault.hang_timeout_s)"
        log.info("%s", msg)  # the log file; the console gets it once, below
        try:
            rundir.dump_trigger.touch()
        except OSError:
            pass
        own.dump_stacks("a hang was detected")
        stuck = _stuck_rank(line, beats)
        try:
            rundir.error_path(stuck).write_text(json.dumps({
                "rank": stuck, "error": line, "type": "Hang", "line": msg, "time": time.time(), "traceback": "",
                "reported_by": own.rank}))
        except OSError:
            pass
        sys.stderr.write(msg + "\n")
        sys.stderr.write(f"hpcfl: every rank's Python stack is in its log ({rundir.logs}/rank-NNNN.log)\n")
        sys.stderr.flush()
        time.sleep(grace_s)  # the other ranks' heartbeat threads write their stacks
        logging.shutdown()
        try:
            world.Abort(1)
        finally:
            os._exit(1)

    return act


def _stuck_rank(line: str, beats: Dict[int, Any]) -> int:
    import re

    m = re.match(r"(?:rank|node \S+ is (?:lost or )?unreachable: its ranks?) (\d+)", line)
    return int(m.group(1)) if m else 0


__all__ = ["Heartbeat", "Watchdog", "verdict", "excuse", "auto_timeout", "end_job_on_hang", "read_beat", "WAITING"]
