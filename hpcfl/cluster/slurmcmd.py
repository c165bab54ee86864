"""Every SLURM client call (squeue, sacct, scontrol, sinfo, sbatch, scancel) goes through :func:`call`.

Why: a SLURM client whose controller is down waits on its own (squeue: 18 s, then "Unable to contact
slurm controller (connect failure)"), and a caller that took any failure for "the job is unknown" then
told the user something false after a minute of silence. Here every call has a deadline
(:func:`deadline_s`: ``--slurm-timeout`` or ``HPCFL_SLURM_TIMEOUT_S``, default 10 s), and a controller
that does not answer raises :class:`ControllerUnreachable` (one line naming the command and SLURM's own
message; the CLI exits with code 3, not 2), distinct from a job SLURM does not know.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional

from ..errors import LaunchError

DEFAULT_TIMEOUT_S = 10.0
TIMEOUT_ENV = "HPCFL_SLURM_TIMEOUT_S"

# What SLURM's clients print when the controller (or, for sacct, slurmdbd) cannot be reached
_UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Socket timed out|Zero Bytes were transmitted|Connection refused|"
    r"connect failure|Connection timed out|Communication connection failure|standby mode|"
    r"Unable to establish a connection|Problem talking to the database|Unable to connect to database", re.I)


class SlurmClientMissing(LaunchError):
    """A SLURM command is not on PATH: this machine is not a SLURM login node."""


class ControllerUnreachable(LaunchError):
    """SLURM's controller (or accounting database) did not answer: the job's state is unknown, not absent."""

    exit_code = 3
    timed_out = False  # True: no answer at all within the deadline (the command may have acted all the same)


_override: Dict[str, float] = {}


def set_deadline(seconds: Optional[float]) -> None:
    """The deadline of every SLURM call from now on (``--slurm-timeout``); None: back to the default."""
    if seconds is None:
        _override.pop("s", None)
        return
    if not (seconds > 0 and seconds < 1e6):
        raise LaunchError(f"--slurm-timeout: {seconds} is not a positive number of seconds")
    _override["s"] = float(seconds)


def deadline_s() -> float:
    """Seconds a SLURM client may take: ``--slurm-timeout``, else $HPCFL_SLURM_TIMEOUT_S, else 10."""
    if "s" in _override:
        return _override["s"]
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and value < 1e6):
        raise LaunchError(f"{TIMEOUT_ENV}={raw!r}: not a positive number of seconds")
    return value


def require_client(name: str) -> str:
    """The path of SLURM client ``name``; SlurmClientMissing ("no SLURM client here: squeue not found ...") if absent."""
    path = shutil.which(name)
    if path is None:
        raise SlurmClientMissing(f"no SLURM client here: {name} not found (install slurm-wlm, or run this on the cluster)")
    return path


def _last_line(*texts) -> str:
    for t in texts:
        if isinstance(t, bytes):
            t = t.decode(errors="replace")
        lines = [ln.strip() for ln in (t or "").splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return ""


def unreachable(stderr: str) -> bool:
    """Whether a SLURM client's complaint says it could not reach the controller or the accounting database."""
    return bool(_UNREACHABLE.search(stderr or ""))


def call(argv: List[str], timeout: Optional[float] = None, env: Optional[Dict[str, str]] = None) \
        -> subprocess.CompletedProcess:
    """Run a SLURM client within the deadline; its CompletedProcess (text) whatever its exit code, except:
    SlurmClientMissing when it is not installed, ControllerUnreachable when it does not answer in time or
    says that it cannot reach the controller."""
    require_client(argv[0])
    limit = deadline_s() if timeout is None else timeout
    words = [a for a in argv[1:] if not a.startswith("-")]
    shown = " ".join([argv[0], *words[:2]]) if argv[0] == "scontrol" else argv[0]  # "scontrol show node"
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as exc:
        said = _last_line(exc.stderr, exc.stdout)
        err = ControllerUnreachable(
            f"{shown}: SLURM did not answer within {limit:g}s" + (f" ({said})" if said else "")
            + f"; its controller is down or overloaded (the deadline: --slurm-timeout or {TIMEOUT_ENV})")
        err.timed_out = True
        raise err from None
    if r.returncode != 0 and unreachable(r.stderr):
        raise ControllerUnreachable(f"{shown}: SLURM's controller does not answer: {_last_line(r.stderr)}")
    return r


def said(r: subprocess.CompletedProcess) -> str:
    """The last line a failed client printed (its error), or its exit code."""
    return _last_line(r.stderr, r.stdout) or f"exit code {r.returncode}"


__all__ = ["ControllerUnreachable", "SlurmClientMissing", "call", "deadline_s", "set_deadline", "require_client",
           "said", "unreachable", "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV"]
