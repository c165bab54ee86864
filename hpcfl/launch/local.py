"""``hpcfl launch``: run a whole federation on this machine under ``mpirun``.

The command is an argv list built by a pure function (:func:`mpirun_argv`),
printed, then run. When the job fails, the launcher names the rank that failed
first and its site, from the ranks' error files or from mpirun's report of a
killed process.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from ..config import Config
from ..errors import ConfigError, LaunchError
from ..topology import topology_for


def rank_argv(config_path: str, overrides: Sequence[str] = (), resume: bool = False, restart: bool = False,
              python: Optional[str] = None, pin: str = "none") -> List[str]:
    """What each rank runs, under any launcher (the launch decisions travel as typed flags: RankLaunch)."""
    from ..runtime import RankLaunch

    argv = [python or sys.executable, "-m", "hpcfl", "run", str(config_path)]
    for o in overrides:
        argv += ["--set", o]
    return argv + RankLaunch(resume=resume, restart=restart, pin=pin).argv()


def local_capacity(cfg: Config, cores: int) -> int:
    """Site ranks this machine runs one to a core (or to a GPU share, where site ranks train on GPUs)."""
    if cfg.train.device != "cpu":
        from ..cluster.nodecheck import count_gpus

        gpus, _ = count_gpus()
        if gpus:
            return gpus * cfg.cluster.ranks_per_gpu
    return cores


def choose_slots(cfg: Config, capacity: int) -> int:
    """``launch.slots``, or one slot per site where ``capacity`` holds every site rank, else as many as fit."""
    from ..topology import auto_slots

    return cfg.launch.slots or auto_slots([s.ranks for s in cfg.sites], capacity)


def describe_slots(cfg: Config, slots: int) -> str:
    from ..topology import topology_for

    t = topology_for(cfg, slots=slots)
    k = len(t.sites)
    if slots == k:
        return f"{t.world_size} ranks: the aggregator and {k} site(s) of their own ranks"
    per = sorted({len(s.sites) for s in t.slots})
    shown = f"{per[0]}" if len(per) == 1 else f"{per[0]}-{per[-1]}"
    return (f"{t.world_size} ranks: the aggregator and {slots} slot(s) simulating {k} sites ({shown} each, in turn; "
            "launch.slots sets it)")


def mpirun_argv(cfg: Config, rank_cmd: Sequence[str], cores: int, as_root: bool, n: Optional[int] = None) -> List[str]:
    """The mpirun command for this machine: one process per rank (``n``, default one slot per site)."""
    n = cfg.world_size if n is None else n
    argv = [cfg.launch.mpirun, "-np", str(n)]
    if as_root:
        argv.append("--allow-run-as-root")
    if n > cores:
        # More ranks than cores: allow it, do not pin several ranks to one core,
        # and make waiting ranks yield the CPU instead of spinning.
        argv += ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    threads = max(1, cores // n) if cfg.train.threads == 0 else cfg.train.threads
    argv += ["-x", f"OMP_NUM_THREADS={threads}"]
    argv += list(cfg.launch.mpirun_args)
    return argv + list(rank_cmd)


_KILLED = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)(?: \(([^)]*)\))?")


def failure_line(cfg: Config, run_dir: Path, mpirun_output: str, returncode: int,
                 world_size: Optional[int] = None, memory: Optional[str] = None) -> str:
    """One line naming what ended the job: the earliest rank error, else a killed rank (killed for memory,
    with what to change, when ``memory`` says why the memory ran out: hpcfl.oom.killed_for_memory)."""
    from ..rundir import RunPaths

    errors = []
    for p in RunPaths(run_dir).error_files():
        try:
            errors.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if errors:
        first = min(errors, key=lambda e: e.get("time", 0))
        return f"{first['line']} (log: {RunPaths(run_dir).log_path(first['rank'])})"
    m = _KILLED.search(mpirun_output)
    if m:
        rank, sig, name = int(m.group(1)), m.group(2), m.group(3) or ""
        try:
            who = topology_for(cfg, world_size).role(rank).describe()
        except Exception:  # noqa: BLE001 - a launcher message naming a rank we do not know
            who = f"rank {rank}"
        if memory and sig == "9":
            from ..oom import ADVICE

            return f"hpcfl: {who} was killed for memory (signal 9): {memory}; {ADVICE}"
        return f"hpcfl: {who} was killed by signal {sig}{f' ({name})' if name else ''}"
    return f"hpcfl: the job failed (mpirun exit code {returncode}); see {RunPaths(run_dir).logs}"


def _pump(src, dst, keep: List[str]) -> None:
    for line in iter(src.readline, ""):
        dst.write(line)
        dst.flush()
        keep.append(line)
        if len(keep) > 2000:
            del keep[:1000]


def resolve(config: Union[str, Path, Config, Mapping[str, Any]],
            overrides: Sequence[str] = ()) -> Tuple[Config, Optional[str], List[str]]:
    """(config, the file the ranks read or None, their overrides) for a YAML path, a Config or a dict.

    A config built or changed in Python has no file: :func:`launch` writes it to the run directory."""
    from ..config import from_dict, load_config, to_dict

    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides), str(config), list(overrides)
    if isinstance(config, Config):
        raw, source = to_dict(config), "<Config object>"
    elif isinstance(config, Mapping):
        raw, source = dict(config), "<dict>"
    else:
        raise ConfigError(f"hpcfl.launch: the config must be a YAML path, a hpcfl.Config or a dict, "
                          f"not {type(config).__name__}")
    return from_dict(raw, source, overrides), None, []


def _written(cfg: Config) -> str:
    """The file that holds a config launched from Python: the ranks read it like any YAML file."""
    from ..atomic import write_atomic
    from ..config import dump_yaml
    from ..rundir import RunPaths

    path = RunPaths.of(cfg).launch_config
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dump_yaml(cfg))
    return str(path)


def launch(cfg: Config, config_path: Optional[str], overrides: Sequence[str] = (), resume: bool = False,
           restart: bool = False, dry_run: bool = False, stdout=None, report: bool = True) -> int:
    """Run the federation under mpirun on this machine; return its exit code."""
    out = stdout or sys.stdout
    if shutil.which(cfg.launch.mpirun) is None:
        raise LaunchError(f"launch.mpirun: {cfg.launch.mpirun!r} not found on PATH; install Open MPI "
                          "(bash scripts/install.sh does) or set launch.mpirun")
    from ..rundir import RunDir

    RunDir(cfg).check(resume=resume, restart=restart)  # refuse a bad resume before starting any rank
    if config_path is None:
        config_path, overrides = _written(cfg), ()
    from ..topology import world_size_for

    cores = len(os.sched_getaffinity(0))
    slots = choose_slots(cfg, local_capacity(cfg, cores))
    n = world_size_for([s.ranks for s in cfg.sites], slots)
    pin = "local" if n > cores else "none"  # mpirun does not bind oversubscribed ranks: they pin themselves
    argv = mpirun_argv(cfg, rank_argv(config_path, overrides, resume, restart, pin=pin), cores=cores,
                       as_root=(os.geteuid() == 0), n=n)
    out.write(f"hpcfl: {describe_slots(cfg, slots)}\n")
    out.write(f"hpcfl: {shlex.join(argv)}\n")
    out.flush()
    if dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    from ..comm import SESSION_ENV

    env.setdefault(SESSION_ENV, "own")  # each rank its own scheduling group, as torchrun does (comm.own_session)
    from ..oom import OomCounters, killed_for_memory

    oom_before = OomCounters.now()  # the ranks run in this process's memory cgroup
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
    seen: List[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, seen), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, seen), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    for t in pumps:
        t.join(timeout=5)
    from ..rundir import RunPaths

    run_dir = RunPaths.of(cfg).path
    if rc != 0:
        memory = killed_for_memory(oom_before, OomCounters.now())
        sys.stderr.write(failure_line(cfg, run_dir, "".join(seen), rc, n, memory) + "\n")
        sys.stderr.flush()
    elif report:
        _report(run_dir, out)
    return rc


def _report(run_dir: Path, out) -> None:
    """The run's HTML report (hpcfl report), written at the end of a successful launch."""
    try:
        from ..observe import write_report

        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run succeeded and its results are on disk: never fail it here
        out.write(f"hpcfl: no report ({type(exc).__name__}: {exc}); the results are in {run_dir}\n")
        return
    out.write(f"report: {path}\n")
    out.flush()
