"""``hpcfl status RUN_DIR``: where a run stands, read from its directory alone (works for local and SLURM runs).

- the run's state: running, finished, stopped, failed, interrupted, starting;
- the round in progress and an ETA from the mean round time (rounds after the first);
- per site, the last round's metrics;
- which ranks are alive: each rank's heartbeat file ``logs/rank-NNNN.beat``
  (``{"rank", "pid", "host", "time", "phase", "round", "site", "progress", "progress_time"}``,
  hpcfl.watchdog.Heartbeat, rewritten every ~2 s while it lives; older than
  :data:`STALE_S` = not alive or stuck, with the phase it was in), else the
  pids manifest.json lists, checked with ``kill(pid, 0)`` where the rank ran
  on this host.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..rundir import RunPaths
from ..rundir.paths import BEAT_GLOB, ERROR_GLOB
from .rundata import RunData, load_run

STALE_S = 10.0  # a heartbeat older than this: the rank is dead or stuck


@dataclass
class RankStatus:
    rank: int
    host: Optional[str] = None
    pid: Optional[int] = None
    site: Optional[str] = None  # the site it works for now (its heartbeat), else its only site
    role: Optional[str] = None
    sites: List[str] = field(default_factory=list)  # every site it serves (a slot's ranks serve several in turn)
    state: str = "unknown"  # alive | stuck (process there, no heartbeat) | gone | done | unknown (another host, no beat)
    phase: Optional[str] = None
    round: Optional[int] = None
    progress: Optional[float] = None  # seconds since the rank last made progress (its beat's progress_time)
    beat_age_s: Optional[float] = None

    def describe(self) -> str:
        serves = self.site or ", ".join(self.sites)
        who = f"rank {self.rank}" + (f" ({serves})" if serves else " (aggregator)" if self.rank == 0 else "")
        where = f"pid {self.pid} on {self.host}" if self.pid else (self.host or "")
        doing = ", ".join(x for x in (f"phase {self.phase}" if self.phase else "",
                                      f"round {self.round}" if self.round else "") if x)
        age = f"last heartbeat {self.beat_age_s:.0f}s ago" if self.beat_age_s is not None else "no heartbeat"
        if self.state == "alive":
            idle = f", no progress for {self.progress:.0f}s" if self.progress is not None and self.progress > 60 else ""
            return f"{who}: alive{f', {doing}' if doing else ''}{idle}"
        if self.state == "done":
            return f"{who}: done"
        if self.state == "stuck":
            return f"{who}: stuck? process {where} lives but {age}{f' ({doing})' if doing else ''}"
        if self.state == "gone":
            return f"{who}: not alive ({where}; {age}{f', was in {doing}' if doing else ''})"
        return f"{who}: unknown ({where}: another host and {age})"


@dataclass
class RunStatus:
    run_dir: str
    name: str
    state: str  # running | finished | stopped | failed | interrupted | starting
    rounds_total: Optional[int] = None
    last_round: int = 0
    round_in_progress: Optional[int] = None
    eta_s: Optional[float] = None
    mean_round_s: Optional[float] = None
    last: Dict[str, Any] = field(default_factory=dict)  # the last round's summary metrics
    sites: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    ranks: List[RankStatus] = field(default_factory=list)
    error: Optional[str] = None
    stop_requested: bool = False
    note: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.state in ("running", "running?", "starting")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def read_beats(logs: Path) -> Dict[int, Dict[str, Any]]:
    """Heartbeats by rank; a file that cannot be read now (being replaced) is skipped, not fatal."""
    out: Dict[int, Dict[str, Any]] = {}
    for p in sorted(Path(logs).glob(BEAT_GLOB)):
        try:
            beat = json.loads(p.read_text())
            rank = int(beat.get("rank", p.stem.split("-")[1]))
        except (OSError, ValueError, TypeError, IndexError):
            continue
        if isinstance(beat, dict):
            out[rank] = beat
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists and is still hpcfl (a reused pid is someone else)."""
    from ..rundir import pid_alive

    if not pid_alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust kill()
    return b"hpcfl" in cmd or b"mpi4py" in cmd


def rank_states(manifest: Optional[Dict[str, Any]], beats: Dict[int, Dict[str, Any]], now: float,
                host: str, stale_s: float = STALE_S, alive=pid_alive) -> List[RankStatus]:
    """Every rank's liveness from heartbeats (preferred) or pids on this host. Pure but for ``alive``."""
    ranks: Dict[int, RankStatus] = {}
    for info in (manifest or {}).get("ranks") or []:
        if isinstance(info, dict) and isinstance(info.get("rank"), int):
            sites = info.get("sites") if isinstance(info.get("sites"), list) else [info["site"]] if info.get("site") else []
            ranks[info["rank"]] = RankStatus(info["rank"], info.get("host"), info.get("pid"), info.get("site"),
                                             info.get("role"), [str(x) for x in sites])
    for r, beat in beats.items():
        st = ranks.setdefault(r, RankStatus(r))
        st.host, st.pid = beat.get("host") or st.host, beat.get("pid") or st.pid
        st.site = beat.get("site") or st.site
        st.phase, st.round = beat.get("phase"), beat.get("round")
        t = beat.get("time")
        st.beat_age_s = max(0.0, now - float(t)) if isinstance(t, (int, float)) else None
        pt = beat.get("progress_time")
        st.progress = max(0.0, now - float(pt)) if isinstance(pt, (int, float)) else None
    for st in ranks.values():
        local = st.host is not None and st.host == host and isinstance(st.pid, int)
        if st.phase == "done":
            st.state = "done"
        elif st.beat_age_s is not None and st.beat_age_s <= stale_s:
            st.state = "alive"
        elif local:
            there = alive(st.pid)
            st.state = ("stuck" if st.beat_age_s is not None else "alive") if there else "gone"
        elif st.beat_age_s is not None:
            st.state = "gone"
        else:
            st.state = "unknown"
    return [ranks[r] for r in sorted(ranks)]


def _error_line(logs: Path) -> Optional[str]:
    errors = []
    for p in Path(logs).glob(ERROR_GLOB):
        try:
            e = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(e, dict) and e.get("line"):
            errors.append(e)
    if not errors:
        return None
    first = min(errors, key=lambda e: e.get("time", 0))
    return str(first["line"])


def site_rows(data: RunData, round_: int) -> Dict[str, Dict[str, Any]]:
    """Per site, the round's metrics: the global model's val accuracy/loss and status, the locally tuned model's."""
    rows: Dict[str, Dict[str, Any]] = {s: {} for s in data.sites()}
    for r in data.records:
        if r.get("kind") != "site" or r.get("round") != round_ or r.get("site") not in rows:
            continue
        row = rows[r["site"]]
        if r.get("split") == "val" and r.get("model", "global") == "global":
            row.update(status=r.get("status"), val_accuracy=r.get("accuracy"), val_loss=r.get("loss"))
        elif r.get("split") == "val" and r.get("model") == "local":
            row.update(local_val_accuracy=r.get("accuracy"))
        elif r.get("split") == "train":
            row.update(train_loss=r.get("loss"))
    return rows


def run_status(run_dir: Path, now: Optional[float] = None, host: Optional[str] = None,
               stale_s: float = STALE_S) -> RunStatus:
    """Read ``run_dir`` and say where the run stands (RunDirError for a missing, empty or corrupt run dir)."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    now = time.time() if now is None else now
    host = host or socket.gethostname()
    paths = RunPaths(run_dir)
    logs = paths.logs
    rounds = data.rounds()
    st = RunStatus(str(run_dir), data.name, "interrupted", data.rounds_total)
    if rounds:
        last = rounds[-1]
        st.last_round = int(last["round"])
        st.last = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        times = [r["time"]["round_s"] for r in (rounds[1:] or rounds)
                 if isinstance(r.get("time"), dict) and isinstance(r["time"].get("round_s"), (int, float))]
        st.mean_round_s = sum(times) / len(times) if times else None
        st.sites = site_rows(data, st.last_round)
    else:
        st.sites = {s: {} for s in data.sites()}
    st.ranks = rank_states(data.manifest, read_beats(logs), now, host, stale_s)
    st.stop_requested = paths.stop_file.exists()
    st.error = _error_line(logs)
    this_launch = max(_mtime(paths.config), _mtime(paths.manifest))
    live = [r for r in st.ranks if r.state in ("alive", "stuck")]
    if data.summary is not None and _mtime(paths.summary) >= this_launch:
        stopped = data.summary.get("stopped_after_round")
        st.state = "stopped" if stopped is not None else "finished"
    elif st.error:  # a rank recorded what ends the job (this launch's: a launch removes older records)
        st.state = "failed"  # its heartbeats, and those of ranks being aborted, may look alive a few seconds more
    elif live:
        st.state = "running"
    elif not data.config and data.manifest is None and not data.records:
        st.state = "not started"
    elif _mtime(paths.manifest) < _mtime(paths.config) and not st.ranks:
        st.state = "starting"
        st.note = "manifest.json is not written yet: the ranks are starting (or the launch failed before)"
    elif st.ranks and all(r.state == "unknown" for r in st.ranks):
        st.state = "running?"
        st.note = "its ranks ran on other hosts and left no heartbeat: ask the scheduler"
    if st.state in ("running", "running?", "starting"):
        beat0 = next((r for r in st.ranks if r.rank == 0 and r.state == "alive" and isinstance(r.round, int)), None)
        nxt = max(st.last_round + 1, beat0.round if beat0 is not None else 0)  # a beat is up to ~2 s old
        st.round_in_progress = min(nxt, st.rounds_total) if st.rounds_total else nxt
        if st.mean_round_s is not None and st.rounds_total:
            left = max(0, st.rounds_total - st.last_round) * st.mean_round_s
            since = now - float(rounds[-1].get("timestamp", now)) if rounds else 0.0
            st.eta_s = max(0.0, left - max(0.0, since))
    return st


def _fmt(v: Any, spec: str = ".4f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _dur(s: Optional[float]) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_status(st: RunStatus) -> List[str]:
    """Plain lines (no control characters): what ``hpcfl status`` prints for a run directory."""
    total = st.rounds_total or "?"
    head = f"{st.run_dir}: {st.state}"
    if st.round_in_progress is not None and st.state != "starting":
        head += f", round {st.round_in_progress}/{total} in progress"
        if st.eta_s is not None:
            head += f", ETA {_dur(st.eta_s)}"
    else:
        head += f", {st.last_round}/{total} rounds done"
    if st.mean_round_s is not None:
        head += f" ({st.mean_round_s:.2f}s per round)"
    if st.stop_requested and st.active:
        head += "; stop requested"
    lines = [head]
    if st.note:
        lines.append(f"  {st.note}")
    if st.error and st.state in ("failed", "interrupted"):
        lines.append(f"  {st.error}")
    if st.last_round:
        lines.append(f"  round {st.last_round}: val_accuracy {_fmt(st.last.get('val_accuracy'))}  "
                     f"val_loss {_fmt(st.last.get('val_loss'))}"
                     + (f"  local_val_accuracy {_fmt(st.last['local_val_accuracy'])}" if "local_val_accuracy" in st.last else "")
                     + (f"  dp_epsilon {_fmt(st.last['dp_epsilon'], '.3g')}" if "dp_epsilon" in st.last else ""))
    if st.sites and any(st.sites.values()):
        width = max(len("site"), *(len(s) for s in st.sites))
        live = st.active and bool(st.ranks)
        lines.append(f"  {'site':<{width}}  status       val_acc  val_loss  local_acc" + ("  ranks" if live else ""))
        for site, m in st.sites.items():
            rk = [r for r in st.ranks if site in r.sites or (not r.sites and r.site == site)]
            alive = sum(r.state == "alive" for r in rk)
            doing = next((f" ({r.phase})" for r in rk if r.state == "alive" and r.phase and r.site == site), "")
            ranks = f"  {alive}/{len(rk)} alive{doing}" if live and rk else ""
            lines.append(f"  {site:<{width}}  {str(m.get('status') or '-'):<11}  {_fmt(m.get('val_accuracy')):>7}  "
                         f"{_fmt(m.get('val_loss')):>8}  {_fmt(m.get('local_val_accuracy')):>9}{ranks}")
    if st.ranks and st.state not in ("finished", "stopped"):
        alive = sum(r.state == "alive" for r in st.ranks)
        lines.append(f"  ranks: {alive}/{len(st.ranks)} alive")
        if st.active or st.state == "running?":
            lines.extend(f"    {r.describe()}" for r in st.ranks if r.state != "alive" or r.rank == 0)
    return lines


def collect(run_dir: Optional[Path], job_id: Optional[str]) -> Tuple[List[str], Dict[str, Any], bool]:
    """What ``hpcfl status`` shows: (plain lines, the same as a dict for --json, whether the run or job is active).

    A SLURM job's line comes first (its real state, exit code and error line); a run directory's progress
    follows. Raises an HpcflError when there is nothing to report (unknown job, empty or corrupt directory)."""
    from ..cluster import slurm
    from ..errors import LaunchError

    lines: List[str] = []
    doc: Dict[str, Any] = {"job": None, "run": None}
    active = False
    if job_id is not None:
        try:
            job = slurm.job_status(job_id, run_dir)
        except slurm.SlurmClientMissing as exc:
            if run_dir is None:
                raise
            lines.append(f"job {job_id}: {exc}")
        except slurm.ControllerUnreachable as exc:  # what the run directory shows still answers
            if run_dir is None:
                raise
            lines.append(f"job {job_id}: SLURM's state is unknown: {exc}; from the run directory:")
            doc["job"] = {"job_id": job_id, "state": "UNKNOWN", "source": None, "unreachable": str(exc)}
        else:
            if not job.known and run_dir is None:
                raise LaunchError(f"job {job_id}: unknown to SLURM (squeue, sacct and scontrol do not know it)")
            lines.append(job.describe())
            doc["job"] = asdict(job)
            active = job.active
    if run_dir is not None:
        if job_id is not None and not Path(run_dir).is_dir():
            lines.append(f"{run_dir}: the job's run directory is not visible from this machine")
        else:
            st = run_status(Path(run_dir))
            lines.extend(format_status(st))
            doc["run"] = st.to_dict()
            active = active or st.active
    return lines, doc, active


def watch(run_dir: Optional[Path], job_id: Optional[str], every_s: float, out=None, as_json: bool = False,
          sleep=time.sleep) -> int:
    """Print the status every ``every_s`` seconds until the run (and its job) is no longer active, or Ctrl-C.

    On a terminal the screen is redrawn; elsewhere (a file, a pipe) each refresh is plain lines under a
    ``--- HH:MM:SS`` header, without control characters; with ``as_json`` one JSON object per line."""
    import sys

    from ..console import is_terminal

    out = out if out is not None else sys.stdout
    tty = is_terminal(out) and not as_json
    try:
        while True:
            lines, doc, active = collect(run_dir, job_id)
            if as_json:
                out.write(json.dumps(doc) + "\n")
            elif tty:
                out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            else:
                out.write(f"--- {time.strftime('%H:%M:%S')}\n" + "\n".join(lines) + "\n")
            out.flush()
            if not active:
                return 0
            sleep(every_s)
    except KeyboardInterrupt:
        return 0
