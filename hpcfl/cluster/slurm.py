"""Submit, follow and cancel federations on SLURM (sbatch, squeue, scontrol, scancel as argv lists).

``hpcfl submit`` renders the script into ``runs/<name>/slurm/``, submits it and
records the job in ``runs/<name>/slurm/jobs.json``; the job carries its run
directory in its comment, so ``hpcfl status JOBID`` finds the progress too.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import Config
from ..errors import LaunchError
from .render import render_sbatch


def _run(argv: List[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"{argv[0]} not found: this machine has no SLURM client (install slurm-wlm, or run on the cluster)")
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise LaunchError(f"{' '.join(argv[:2])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else r.returncode}")
    return r.stdout


def submit(cfg: Config, config_path: str, overrides: Sequence[str] = (), launcher: Optional[str] = None) -> Dict[str, Any]:
    """Render, write and sbatch the job; returns {"job_id", "script", "run_dir"}."""
    text = render_sbatch(cfg, config_path, overrides, launcher)
    run_dir = Path(cfg.run.root) / cfg.run.name
    d = run_dir / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    script = d / f"job-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script.write_text(text)
    out = _run(["sbatch", "--parsable", f"--output={d.resolve()}/%j.out", str(script)]).strip()
    job_id = out.split(";")[0]
    jobs_path = d / "jobs.json"
    jobs = json.loads(jobs_path.read_text()) if jobs_path.exists() else []
    jobs.append({"job_id": job_id, "script": str(script), "submitted_at": time.time(),
                 "launcher": launcher or cfg.cluster.launcher})
    jobs_path.write_text(json.dumps(jobs, indent=2))
    return {"job_id": job_id, "script": str(script), "run_dir": str(run_dir), "log": str(d / f"{job_id}.out")}


def job_state(job_id: str) -> str:
    """PENDING, RUNNING, ... from squeue; FINISHED once it has left the queue (sacct where accounting exists)."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip() if _in_queue(job_id) else ""
    if out:
        return out.splitlines()[0]
    if shutil.which("sacct"):
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0].split()[0]
    return "FINISHED"


def _in_queue(job_id: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


def run_dir_of_job(job_id: str) -> Optional[Path]:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    m = re.search(r"Comment=hpcfl:(\S+)", r.stdout or "")
    w = re.search(r"WorkDir=(\S+)", r.stdout or "")
    if not m:
        return None
    p = Path(m.group(1))
    return p if p.is_absolute() or not w else Path(w.group(1)) / p


def progress(run_dir: Path) -> Dict[str, Any]:
    """Last complete round, per-site metrics of it, and an ETA from the rounds' mean time."""
    import yaml

    run_dir = Path(run_dir)
    out: Dict[str, Any] = {"run_dir": str(run_dir)}
    cfg_path = run_dir / "config.yaml"
    rounds = (yaml.safe_load(cfg_path.read_text()) or {}).get("fl", {}).get("rounds") if cfg_path.exists() else None
    out["rounds"] = rounds
    recs = []
    mp = run_dir / "metrics.jsonl"
    if mp.exists():
        for line in mp.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    summaries = [r for r in recs if r.get("kind") == "round"]
    if summaries:
        last = summaries[-1]
        out["last_round"] = last["round"]
        out["val_accuracy"] = last.get("val_accuracy")
        out["sites"] = {r["site"]: {"val_accuracy": r.get("accuracy"), "val_loss": r.get("loss")}
                        for r in recs if r.get("kind") == "site" and r["round"] == last["round"] and r.get("split") == "val"
                        and r.get("model", "global") == "global"}
        times = [s["time"]["round_s"] for s in summaries[1:] or summaries]
        if rounds:
            out["eta_s"] = max(0, rounds - last["round"]) * sum(times) / len(times)
    else:
        out["last_round"] = 0
    jobs = run_dir / "slurm" / "jobs.json"
    if jobs.exists():
        out["jobs"] = [j["job_id"] for j in json.loads(jobs.read_text())]
    return out


def cancel(job_id: str) -> None:
    _run(["scancel", job_id])
