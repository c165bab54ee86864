#!/usr/bin/env python
"""Everything GPU in ONE call under ONE deadline, for a short loan of a GPU node (docs/gpu.md).

Run by ``bash bench/gpu_check.sh`` with the node's Python (standard library only until
the carried wheels are installed). The deadline (default 480 s) counts the wheel
install: each step gets its planned limit or what is left, whichever is less, and a
step with too little time left is skipped; the check says so in both cases.
``results.json`` is rewritten after every step, so a run cut off from outside still
returns everything done so far.

The environment the steps run in (:func:`check_env`) makes the carried Open MPI the one
every process loads: ``mpirun`` from the prefix and ``LD_LIBRARY_PATH`` /
``MPI4PY_LIBMPI`` naming its ``libmpi`` (mpi4py 4.x looks for libmpi only in its own
venv/user/system prefixes and the loader path: a plain ``python -c "from mpi4py import MPI"``
on a node without MPI fails without them, and on a node with another MPI loads that one).
Carried wheels whose project the node already has are not installed: the node's own
pytest keeps its plugins, the node's own packages their versions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parents[1]
DEADLINE_S = 480  # one command on a lent GPU machine may run 600 s; the machine's start and copies take the rest
INSTALL_S = 45  # pip install --no-index of ~33 MB of wheels
RESERVE_S = 10  # writing results, and slack
MIN_STEP_S = 15  # a step given less than this is skipped: it could not start torch and CUDA
EXPORTED = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "MPI4PY_LIBMPI", "OMPI_ALLOW_RUN_AS_ROOT",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")  # what --install-only prints


@dataclass(frozen=True)
class Step:
    """One step of the check: its planned limit, its argv, the JSON file it writes (merged into results)."""

    name: str
    limit: int
    argv: Tuple[str, ...]
    output: Optional[str] = None  # file name under the output folder


def plan(py: str, out: Path, mpirun: str) -> List[Step]:
    """The steps after the install, in order. Their planned limits plus INSTALL_S and RESERVE_S fit DEADLINE_S
    (tests/unit/test_gpu_check.py sums them)."""
    common = ("--no-report", "--set", "observe.tensorboard=false", "--set", "site.backend=torch",
              "--set", f"launch.mpirun={mpirun}")
    fed = ("configs/digits-2x2.yaml", "--set", "data.name=synthetic", "--set", "data.features=1024",
           "--set", "data.samples=16384", "--set", "model.hidden=[2048, 2048]", "--set", "fl.rounds=5",
           "--set", "fl.local_epochs=1", "--set", "train.batch_size=128", "--set", "launch.slots=2",
           "--set", "cluster.ranks_per_gpu=4")
    steps = [
        Step("node", 20, (py, str(HERE / "bench" / "gpu_node.py"), str(out / "node.json")), "node.json"),
        Step("gpu-tier", 150, (py, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider",
                               "--junitxml", str(out / "gpu-tier.xml"))),
        Step("tiles", 45, (py, "bench/gpu_tiles.py", "--json", str(out / "gpu_tiles.json")), "gpu_tiles.json"),
        Step("train", 60, (py, "bench/gpu_train.py", "--json", str(out / "gpu_train.json")), "gpu_train.json"),
    ]
    for dev in ("cuda", "cpu"):
        steps.append(Step(f"federation-{dev}", 50, (
            py, "-m", "hpcfl", "launch", *fed, *common, "--set", f"run.root={out / 'runs'}",
            "--set", f"run.name=fed-{dev}", "--set", f"train.device={dev}", "--restart")))
    steps.append(Step("overhead", 40, (py, "bench/federation_overhead.py", "--device", "cuda", "--sizes", "10,25",
                                       "--sites", "2", "--rounds", "4", "--mpirun", mpirun,
                                       "--json", str(out / "overhead.json")), "overhead.json"))
    return steps


class Budget:
    """Time left before the deadline, on an injectable clock (tests fast-forward it)."""

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.monotonic):
        self.deadline_s, self.clock = deadline_s, clock
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def limit_for(self, planned: int) -> Optional[int]:
        """The step's limit: its planned one, or what is left before the deadline less the reserve; None: skip."""
        left = int(self.left() - RESERVE_S)
        if left < MIN_STEP_S:
            return None
        return min(planned, left)


def site_packages(prefix: Path, version: Tuple[int, int] = sys.version_info[:2]) -> Path:
    return prefix / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"


def check_env(base: Mapping[str, str], prefix: Path, here: Path = HERE,
              version: Tuple[int, int] = sys.version_info[:2]) -> Dict[str, str]:
    """The environment every step runs in: the carried Open MPI first on PATH and for the loader, mpi4py told
    which libmpi to load, the carried packages and the repository importable."""
    env = dict(base)
    lib = prefix / "lib"

    def front(key: str, value: str) -> str:
        return value + (os.pathsep + env[key] if env.get(key) else "")

    env["PATH"] = front("PATH", str(prefix / "bin"))
    env["PYTHONPATH"] = front("PYTHONPATH", f"{site_packages(prefix, version)}{os.pathsep}{here}")
    env["LD_LIBRARY_PATH"] = front("LD_LIBRARY_PATH", str(lib))
    if (lib / "libmpi.so.40").exists():
        env["MPI4PY_LIBMPI"] = str(lib / "libmpi.so.40")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1",
               HPCFL_GPU_BACKEND="torch")
    return env


def project_of(wheel: Path) -> str:
    """A wheel's project name, normalised (PEP 503): ``pytest_timeout-2.4.0-...whl`` -> ``pytest-timeout``."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def node_has(project: str) -> Optional[str]:
    """The version of ``project`` the node's Python already has, or None."""
    from importlib import metadata

    try:
        return metadata.version(project)
    except metadata.PackageNotFoundError:
        return None


def to_install(wheels: Sequence[Path], has: Callable[[str], Optional[str]] = node_has) -> Tuple[List[Path], Dict[str, str]]:
    """(wheels to install, {project: the node's version} kept instead): the node's own packages win, so a
    carried pytest never hides the node's pytest and its plugins."""
    install, kept = [], {}
    for w in wheels:
        v = has(project_of(w))
        if v is None:
            install.append(w)
        else:
            kept[project_of(w)] = v
    return install, kept


class Results:
    """results.json, rewritten (atomically) after every step."""

    def __init__(self, out: Path, deadline_s: float):
        self.out, self.path = out, out / "results.json"
        self.data: Dict[str, object] = {"deadline_s": deadline_s, "steps": []}

    def add(self, record: Dict[str, object], output: Optional[str] = None) -> None:
        self.data["steps"].append(record)  # type: ignore[union-attr]
        if output and (self.out / output).exists():
            try:
                self.data[Path(output).stem] = json.loads((self.out / output).read_text())
            except ValueError as exc:
                record["output_error"] = f"{output}: {exc}"
        self.write()

    def write(self) -> None:
        self.data["federations"] = federations(self.out / "runs")
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def steady_round_s(metrics: Path) -> Optional[float]:
    """Median round wall time over rounds 2.. (round 1 pays start-up, CUDA context and cuDNN's autotuning)."""
    times = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "round" and int(rec.get("round", 0)) >= 2:
            t = (rec.get("time") or {}).get("round_s")
            if isinstance(t, (int, float)):
                times.append(float(t))
    return statistics.median(times) if times else None


def federations(runs: Path) -> Dict[str, object]:
    """Each federation run's steady-state round time, final accuracy and time breakdown, and cuda/cpu ratio."""
    out: Dict[str, object] = {}
    for dev in ("cuda", "cpu"):
        run = runs / f"fed-{dev}"
        if not (run / "metrics.jsonl").exists():
            continue
        rec: Dict[str, object] = {"steady_round_s": steady_round_s(run / "metrics.jsonl")}
        if (run / "summary.json").exists():
            s = json.loads((run / "summary.json").read_text())
            rec.update(elapsed_s=s.get("elapsed_s"), final=(s.get("final") or {}).get("val_accuracy"),
                       time_breakdown=s.get("time_breakdown"))
        out[dev] = rec
    a, b = (out.get(d, {}).get("steady_round_s") for d in ("cuda", "cpu"))  # type: ignore[union-attr]
    if a and b:
        out["cpu_over_cuda_round_time"] = b / a
    return out


def run_step(argv: Sequence[str], limit: int, env: Mapping[str, str], log) -> int:
    """Run ``argv`` for at most ``limit`` seconds (its whole process group is killed then: rc 124), its output
    copied to the console and to ``log`` as it comes."""
    p = subprocess.Popen(list(argv), cwd=HERE, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)

    def copy() -> None:
        for line in iter(p.stdout.readline, b""):
            sys.stdout.write(line.decode(errors="replace"))
            log.write(line.decode(errors="replace"))
        sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        rc = 124
    reader.join(timeout=5)
    return rc


def install(wheels: Sequence[Path], prefix: Path, py: str, limit: int, env: Mapping[str, str], log) -> int:
    argv = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--ignore-installed",
            "--disable-pip-version-check", "--prefix", str(prefix), *map(str, wheels)]
    return run_step(argv, limit, env, log) if wheels else 0


Runner = Callable[[Sequence[str], int, Mapping[str, str], object], int]


def run_all(steps: Sequence[Step], budget: Budget, results: Results, env: Mapping[str, str], log,
            runner: Runner = run_step) -> None:
    """Each step under its share of the deadline, results.json rewritten after each; says what it cut."""
    for s in steps:
        limit = budget.limit_for(s.limit)
        record: Dict[str, object] = {"step": s.name, "planned_s": s.limit, "command": " ".join(s.argv)}
        if limit is None:
            say(log, f"=== {s.name}: SKIPPED, {budget.left():.0f}s left before the {budget.deadline_s:.0f}s deadline")
            record.update(skipped=True, reason=f"deadline: {budget.left():.0f}s left")
            results.add(record)
            continue
        if limit < s.limit:
            say(log, f"=== {s.name}: limit SHORTENED from {s.limit}s to {limit}s by the deadline")
        say(log, f"\n=== {s.name} (limit {limit}s): {' '.join(s.argv)}")
        t0 = budget.elapsed()
        rc = runner(s.argv, limit, env, log)
        dt = budget.elapsed() - t0
        say(log, f"=== {s.name}: exit {rc} after {dt:.0f}s" + (" (TIMED OUT)" if rc == 124 else ""))
        record.update(limit_s=limit, exit=rc, seconds=round(dt, 1), timed_out=rc == 124)
        results.add(record, s.output)


def say(log, line: str) -> None:
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("HPCFL_GPU_DEADLINE_S", DEADLINE_S)),
                    help=f"seconds for everything, wheel install included (default {DEADLINE_S})")
    ap.add_argument("--install-only", action="store_true",
                    help="install the wheels, print the environment to export, run nothing else")
    ap.add_argument("--prefix", help="where the wheels go (default: a new temporary folder)")
    a = ap.parse_args(argv)
    budget = Budget(a.deadline)
    out = Path(os.environ["OUT"]) / "gpu-check" if os.environ.get("OUT") else HERE / "gpu-check-results"
    out.mkdir(parents=True, exist_ok=True)
    wheels = sorted(Path(os.environ.get("HPCFL_GPU_WHEELS", HERE / ".gpu-wheels")).glob("*.whl"))
    if not wheels:
        print(f"gpu_check: no wheels in {os.environ.get('HPCFL_GPU_WHEELS', HERE / '.gpu-wheels')}: run bash "
              "scripts/fetch_gpu_wheels.sh where a package registry is reachable")
        return 2
    prefix = Path(a.prefix) if a.prefix else Path(__import__("tempfile").mkdtemp(prefix="hpcfl-gpu."))
    py = sys.executable
    results = Results(out, a.deadline)
    with open(out / "check.log", "a") as log:
        say(log, f"hpcfl GPU check, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, python {py}, "
                 f"deadline {a.deadline:.0f}s")
        chosen, kept = to_install(wheels, node_has)
        if kept:
            say(log, "gpu_check: the node's own " + ", ".join(f"{k} {v}" for k, v in sorted(kept.items()))
                + " kept (carried wheels of these not installed)")
        t0 = budget.elapsed()
        rc = install(chosen, prefix, py, max(MIN_STEP_S, min(INSTALL_S * 2, int(budget.left() - RESERVE_S))),
                     os.environ, log)
        env = check_env(os.environ, prefix)  # after the install: it names the libmpi the wheels put there
        results.data["environment"] = {k: env[k] for k in EXPORTED if k in env}
        results.add({"step": "install", "planned_s": INSTALL_S, "exit": rc, "seconds": round(budget.elapsed() - t0, 1),
                     "installed": [w.name for w in chosen], "kept": kept})
        if rc != 0:
            say(log, "gpu_check: installing the carried wheels failed")
            return 2
        if a.install_only:
            import shlex

            for k, v in results.data["environment"].items():  # type: ignore[union-attr]
                print(f"export {k}={shlex.quote(v)}")
            return 0
        run_all(plan(py, out, str(prefix / "bin" / "mpirun")), budget, results, env, log)
        say(log, f"gpu_check: results in {results.path}; done in {budget.elapsed():.0f}s of {a.deadline:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
