"""Submit, follow and cancel federations on SLURM (sbatch, squeue, scontrol, scancel as argv lists).

``hpcfl submit`` renders the script into ``runs/<name>/slurm/``, submits it and
records the job in ``runs/<name>/slurm/jobs.json``; the job carries its run
directory in its comment, so ``hpcfl status JOBID`` finds the progress too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import Config
from ..errors import LaunchError
from ..rundir.paths import RunPaths
from .render import render_sbatch
from .slurmcmd import ControllerUnreachable, SlurmClientMissing, call, require_client, said  # noqa: F401 - re-exported


def _run(argv: List[str], env: Optional[Dict[str, str]] = None) -> str:
    r = call(argv, env=env)
    if r.returncode != 0:
        raise LaunchError(f"{' '.join(argv[:2])} failed: {said(r)}")
    return r.stdout


def _query(argv: List[str]) -> Optional[str]:
    """stdout of a SLURM query, or None when it fails (an unknown job, accounting switched off);
    ControllerUnreachable when SLURM does not answer."""
    r = call(argv)
    return r.stdout if r.returncode == 0 else None


def _sbatch_env() -> Optional[Dict[str, str]]:
    """The environment sbatch passes to the job (SLURM exports the submitter's): as root, Open MPI's
    permission to run as root, which mpirun refuses otherwise (local test clusters run jobs as root)."""
    if os.geteuid() != 0:
        return None
    return {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def submit(cfg: Config, config_path: str, overrides: Sequence[str] = (), launcher: Optional[str] = None) -> Dict[str, Any]:
    """Render, write and sbatch the job; returns {"job_id", "script", "run_dir"}."""
    text = render_sbatch(cfg, config_path, overrides, launcher)
    run_dir = Path(cfg.run.root) / cfg.run.name
    recorded_jobs(run_dir)  # a corrupt jobs.json is named before anything is submitted
    d = run_dir / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    script = d / f"job-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script.write_text(text)
    try:
        out = _run(["sbatch", "--parsable", f"--output={d.resolve()}/%j.out", str(script)], env=_sbatch_env()).strip()
    except ControllerUnreachable as exc:
        if not exc.timed_out:  # sbatch said it failed: nothing was submitted
            raise
        raise ControllerUnreachable(f"{exc}; the job may have been submitted all the same: look with squeue --me "
                                    "before submitting again") from None
    job_id = out.split(";")[0]
    jobs_path = RunPaths(run_dir).slurm_jobs
    jobs = json.loads(jobs_path.read_text()) if jobs_path.exists() else []
    jobs.append({"job_id": job_id, "script": str(script), "submitted_at": time.time(),
                 "launcher": launcher or cfg.cluster.launcher})
    jobs_path.write_text(json.dumps(jobs, indent=2))
    return {"job_id": job_id, "script": str(script), "run_dir": str(run_dir), "log": str(d / f"{job_id}.out")}


# States in which a job still holds or waits for resources; any other is where it ended.
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


@dataclass
class JobStatus:
    """What SLURM knows about a job. ``state`` is SLURM's word (RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT,
    PREEMPTED, OUT_OF_MEMORY, NODE_FAIL, ...) or UNKNOWN when no SLURM command knows the job any more."""
    job_id: str
    state: str
    source: Optional[str] = None  # squeue | sacct | scontrol
    exit_code: Optional[str] = None  # "exit:signal", as SLURM writes it
    reason: Optional[str] = None
    log: Optional[str] = None  # the job's output file
    error_line: Optional[str] = None  # the line in it that says what failed
    memory: Optional[str] = None  # the job's --mem per node as SLURM records it (MinMemoryNode), e.g. "3G"
    oom: Optional[str] = None  # who was killed for memory, from the log ("rank 2 (site 'hospital-b')"; "a rank")

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def known(self) -> bool:
        return self.source is not None

    def describe(self) -> str:
        """``job 8: FAILED (exit code 1, NonZeroExitCode): hpcfl: rank 2 ... failed: ... (log: ...)``."""
        bits = []
        code = exit_text(self.exit_code)
        if code and not self.active:
            bits.append(code)
        if self.reason and self.reason not in ("None", "(null)"):
            bits.append(self.reason)
        text = f"job {self.job_id}: {self.state}" + (f" ({', '.join(bits)})" if bits else "")
        if not self.known:
            text = f"job {self.job_id}: no longer known to SLURM (it left the queue; no accounting records it)"
        if self.error_line:
            text += f": {self.error_line}"
            if self.log:
                text += f" (log: {self.log})"
        if self.state == "OUT_OF_MEMORY" or self.oom:
            from ..oom import ADVICE

            limit = f"the job's limit is {self.memory} per node (--mem); " if self.memory else ""
            text += f"; {self.oom or 'a rank'} was killed for memory: {limit}{ADVICE}"
        return text


def exit_text(code: Optional[str]) -> Optional[str]:
    """SLURM's ``exit:signal`` in words: "exit code 1", "signal 9"; None for 0:0 or nothing."""
    if not code:
        return None
    head, _, sig = code.partition(":")
    if sig and sig not in ("0", ""):
        return f"signal {sig}"
    if head and head != "0":
        return f"exit code {head}"
    return None


def _field(text: str, key: str) -> Optional[str]:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", text)
    return m.group(1) if m else None


def parse_sacct(out: str, job_id: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """(state, exit code, reason) of ``job_id`` from ``sacct -n -X -P -o JobID,State,ExitCode,Reason``."""
    found = None
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0].split("_")[0].split(".")[0] == job_id and parts[1]:
            found = (parts[1].split()[0], parts[2], parts[3] if len(parts) > 3 and parts[3] else None)
    return found  # the last line: a requeued job's latest run


def parse_scontrol(out: str) -> Optional[Dict[str, Optional[str]]]:
    """JobState, ExitCode, Reason, StdOut, Comment, WorkDir, MinMemoryNode from ``scontrol show job``."""
    state = _field(out, "JobState")
    if not state:
        return None
    return {k: _field(out, k) for k in ("JobState", "ExitCode", "Reason", "StdOut", "Comment", "WorkDir",
                                        "MinMemoryNode")}


# A step's task killed by its cgroup's memory limit: srun names the task (= the MPI rank), slurmstepd counts the
# kills; the job itself ends FAILED (its batch script's srun failed) unless the batch step was the one killed.
_OOM_TASK = re.compile(r"srun: error: \S+: tasks? (\d+)(?:[-,]\S*)?: Out Of Memory")
_OOM_EVENT = re.compile(r"Detected \d+ oom[-_]kill event", re.I)


def oom_victim(log_text: str, run_dir: Optional[Path] = None) -> Optional[str]:
    """Who the job log says was killed for memory: "rank 2 (site 'hospital-b')" (srun's task number is the
    rank; its site from the run's manifest.json), "a rank" when only slurmstepd's count says so, else None."""
    m = _OOM_TASK.search(log_text)
    if m is None:
        return "a rank" if _OOM_EVENT.search(log_text) else None
    rank = int(m.group(1))
    site = None
    if run_dir is not None:
        from ..observe.rundata import RunDirError, read_json

        try:
            ranks = (read_json(RunPaths(run_dir).manifest, dict) or {}).get("ranks") or []
        except RunDirError:  # a damaged manifest: the rank is still named
            ranks = []
        site = next((r.get("site") for r in ranks if isinstance(r, dict) and r.get("rank") == rank), None)
    return f"rank {rank}" + (f" (site {site!r})" if site else "")


_FAILED = re.compile(r"^hpcfl: .*(failed|killed by signal|was killed)", re.I)
_ERRORISH = re.compile(r"(error|exception|killed|oom|out of memory|cancelled|due to time limit)", re.I)


def error_line(text: str, limit: int = 400) -> Optional[str]:
    """The line of a job log that says what failed: hpcfl's ``hpcfl: ... failed: ...`` line, else the last
    line that looks like an error (a Python exception, srun's or slurmstepd's complaint)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in reversed(lines) if _FAILED.search(ln)), None)
    if pick is None:
        pick = next((ln for ln in reversed(lines) if _ERRORISH.search(ln)), None)
    if pick is None:
        return None
    return pick if len(pick) <= limit else pick[:limit - 3] + "..."


def job_status(job_id: str, run_dir: Optional[Path] = None) -> JobStatus:
    """The job's state: squeue while it is queued or running; once it has left, sacct where accounting exists,
    else ``scontrol show job`` (which remembers a finished job for MinJobAge); the error line from its log.

    ControllerUnreachable (not "unknown") when squeue gets no answer, or when the job has left the queue,
    scontrol does not know it and sacct could not reach the accounting database: every call has a deadline
    and the first that finds the controller down ends the search (the others would wait as long)."""
    st = JobStatus(job_id, "UNKNOWN")
    out = _query(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])  # no answer: raised here, nothing else is asked
    row = (out or "").strip().splitlines()
    acct_down: Optional[ControllerUnreachable] = None
    if row and row[0].split("|")[0] in ACTIVE:
        state, _, reason = row[0].partition("|")
        st.state, st.source, st.reason = state, "squeue", reason or None
    elif shutil.which("sacct"):
        try:
            got = parse_sacct(_query(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"])
                              or "", job_id)
        except ControllerUnreachable as exc:  # slurmdbd down: scontrol may still know the job
            got, acct_down = None, exc
        if got:
            st.state, st.exit_code, st.reason = got
            st.source = "sacct"
    _from_scontrol(st, job_id)
    if st.source is None and row and row[0].split("|")[0]:  # squeue still lists it in an end state
        state, _, reason = row[0].partition("|")
        st.state, st.source, st.reason = state, "squeue", reason or None
    if st.source is None and acct_down is not None:
        raise ControllerUnreachable(f"job {job_id} has left the queue and the accounting database does not answer "
                                    f"({acct_down})")
    if st.log is None and run_dir is not None:
        st.log = str(Path(run_dir) / "slurm" / f"{job_id}.out")
    if not st.active and st.log and st.state != "COMPLETED":
        try:
            text = Path(st.log).read_text(errors="replace")
        except OSError:
            text = ""
        st.error_line, st.oom = error_line(text), oom_victim(text, run_dir)
    return st


def _from_scontrol(st: JobStatus, job_id: str) -> None:
    """The job's log (and its state, if no other source knew it) from ``scontrol show job``."""
    if not shutil.which("scontrol"):
        return
    try:
        sc = _query(["scontrol", "show", "job", job_id])
    except ControllerUnreachable:
        if st.source is None:
            raise
        return  # squeue or sacct answered: what they said stands
    info = parse_scontrol(sc) if sc else None
    if info:
        if st.source is None:
            st.state, st.exit_code, st.reason, st.source = info["JobState"] or "UNKNOWN", info["ExitCode"], \
                info["Reason"], "scontrol"
        st.log = info["StdOut"]
        st.memory = info["MinMemoryNode"] if info["MinMemoryNode"] not in (None, "0") else None


def run_dir_of_job(job_id: str) -> Optional[Path]:
    """The run directory a job submitted by ``hpcfl submit`` carries in its comment (None if it does not)."""
    out = _query(["scontrol", "show", "job", job_id])
    comment = _field(out or "", "Comment")
    if not comment or not comment.startswith("hpcfl:"):
        return None
    p = Path(comment[len("hpcfl:"):])
    work = _field(out or "", "WorkDir")
    return p if p.is_absolute() or not work else Path(work) / p


def recorded_jobs(run_dir: Path) -> List[str]:
    """Job ids ``hpcfl submit`` recorded in ``runs/<name>/slurm/jobs.json`` (oldest first); a corrupt file is named."""
    from ..observe.rundata import read_json

    path = RunPaths(run_dir).slurm_jobs
    jobs = read_json(path, list)
    if jobs is None:
        return []
    if not all(isinstance(j, dict) and str(j.get("job_id", "")).strip() for j in jobs):
        raise LaunchError(f"{path}: corrupt (a list of {{\"job_id\": ...}} records expected)")
    return [str(j["job_id"]) for j in jobs]


def cancel(job_id: str) -> None:
    _run(["scancel", job_id])
