#!/usr/bin/env python
"""Start-up of a federation, phase by phase, for this tree next to another checkout, alternating runs.

Every rank logs how long each start-up phase took (``start-up: <phase> took <s>``); this runs
``hpcfl launch configs/digits.yaml --set fl.rounds=1`` from this tree and from ``--other`` (e.g. a
worktree of an older commit: ``git worktree add /tmp/old <rev>``), ``--repeats`` times each,
alternating, and prints the median of each phase per rank role, the wall time of the whole
command and of rank 0's wait for the others.

    python bench/startup.py --other /tmp/old --repeats 5
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
LAP = re.compile(r"rank (\d+) INFO start-up: (.+?) took ([0-9.]+)s")


def _no_report(tree: Path) -> List[str]:
    """Trees that write an HTML report at the end of a launch are told not to: start-up is measured."""
    r = subprocess.run([sys.executable, "-m", "hpcfl", "launch", "--help"], cwd=tree, capture_output=True, text=True)
    return ["--no-report"] if "--no-report" in r.stdout else []


def one(tree: Path, tmp: Path, name: str, sets: List[str]) -> Dict[str, float]:
    argv = [sys.executable, "-m", "hpcfl", "launch", "configs/digits.yaml", *_no_report(tree),
            "--set", f"run.root={tmp}", "--set", f"run.name={name}", "--set", "fl.rounds=1",
            "--set", "eval.cross_site=false"]
    for s in sets:
        argv += ["--set", s]
    t = time.perf_counter()
    r = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{tree}: launch failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    out: Dict[str, float] = {"wall (whole command)": wall}
    for log in sorted((tmp / name / "logs").glob("rank-*.log")):
        for rank, phase, sec in LAP.findall(log.read_text()):
            role = "rank 0" if rank == "0" else "site rank"
            key = f"{role}: {phase}"
            out[key] = max(out.get(key, 0.0), float(sec))  # the slowest rank of the role sets the pace
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="the other checkout (run with this tree's Python)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="extra --set for both")
    a = ap.parse_args()
    trees = {"this tree": ROOT, "other": Path(a.other).resolve()}
    runs: Dict[str, List[Dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="hpcfl-startup-") as tmp:
        for i in range(a.repeats):
            for label, tree in trees.items():
                d = Path(tmp) / f"{label.replace(' ', '')}-{i}"
                runs[label].append(one(tree, d, "s", a.set))
                print(f"run {i + 1}/{a.repeats} {label}: {runs[label][-1]['wall (whole command)']:.2f} s", flush=True)
    keys = sorted({k for rs in runs.values() for r in rs for k in r}, key=lambda k: (not k.startswith("wall"), k))
    print(f"\nmedian seconds over {a.repeats} runs each ({trees['other']} vs {ROOT}):")
    print(f"{'phase':<52} {'other':>8} {'this tree':>10}")
    for k in keys:
        cells = []
        for label in ("other", "this tree"):
            vals = [r[k] for r in runs[label] if k in r]
            cells.append(f"{statistics.median(vals):>8.3f}" if vals else f"{'-':>8}")
        print(f"{k:<52} {cells[0]:>8} {cells[1]:>10}")


if __name__ == "__main__":
    main()
