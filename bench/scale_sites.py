#!/usr/bin/env python
"""More sites than processes: hpcfl's site slots next to Flower's simulation engine, K = 2 .. 128, in one run.

The federation (the same work on both sides, as in bench/vs_flower.py): scikit-learn's
digits split IID over K sites of one rank, each site's part split 80/20 into
train/validation; an MLP 64-256-10; per round every site trains 1 local epoch of
SGD (lr 0.1, momentum 0.9, batch 32, fresh optimizer state) from the global model,
FedAvg weighted by training samples, and the new global model evaluated on every
site's validation split. 10 rounds.

(a) hpcfl as a user runs it: ``hpcfl launch configs/digits.yaml --set sites={count: K, ranks: 1}
    --set model.hidden=[256]``, with the slots it chooses on this machine (printed), locally
    tuned and cross-site evaluation, TensorBoard and the HTML report off (Flower does none of
    them); it still checkpoints every round (Flower does not).
(b) Flower 1.41 ``run_simulation`` on Ray, K virtual SuperNodes with 1 CPU each on this
    machine's cores (bench/vs_flower.py's ServerApp/ClientApp, same partition, shuffles and
    initial weights, so both follow the same trajectory up to float rounding).

Measured for each side and K: wall time of the whole command (start-up included), peak
PSS of its process tree (sampled every 50 ms from /proc/<pid>/smaps_rollup: shared pages
counted once), per-round overhead = max(0, round - training of the slowest slot or client),
the median over rounds 2.. (steady state) and the mean over all rounds (round 1 included), and
the final validation accuracy.

    .venv/bin/python bench/scale_sites.py                   # K = 2 4 8 16 32 64 128 (needs .bench-venv)
    .venv/bin/python bench/scale_sites.py --ks 2 16 --no-flower
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import vs_flower  # noqa: E402  (the Flower side and its environment)

ROUNDS = 10
HIDDEN = [256]


def _children(pid: int) -> List[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree_pss(pid: int) -> int:
    """Proportional set size (bytes) of a process and all its descendants."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


def measured(argv: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, log: Optional[Path] = None):
    """(exit code, wall seconds, peak PSS bytes of the process tree) of a command."""
    t = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], tree_pss(proc.pid))

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    return rc, time.perf_counter() - t, peak[0]


def run_hpcfl(tmp: Path, k: int) -> Dict[str, Any]:
    name = f"k{k}"
    argv = [sys.executable, "-m", "hpcfl", "launch", "configs/digits.yaml", "--no-report",
            "--set", f"run.root={tmp}", "--set", f"run.name={name}", "--set", f"sites={{count: {k}, ranks: 1}}",
            "--set", f"model.hidden={HIDDEN}", "--set", f"fl.rounds={ROUNDS}", "--set", "eval.locally_tuned=false",
            "--set", "eval.cross_site=false", "--set", "observe.tensorboard=false"]
    log = tmp / f"{name}.log"
    rc, wall, pss = measured(argv, ROOT, log=log)
    if rc != 0:
        sys.exit(f"hpcfl K={k} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    recs = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    rounds = [{"round": x["round"], "round_s": x["time"]["round_s"], "train_s": x["time"]["train_s"],
               "val_accuracy": x["val_accuracy"]} for x in recs if x["kind"] == "round"]
    manifest = json.loads((tmp / name / "manifest.json").read_text())
    summary = json.loads((tmp / name / "summary.json").read_text())
    return {"wall_s": wall, "pss": pss, "rounds": rounds, "slots": len(manifest["slots"]),
            "startup": summary.get("startup_s", {})}


def run_flower(tmp: Path, k: int) -> Dict[str, Any]:
    spec = {"seed": 0, "rounds": ROUNDS, "clients": k, "val_fraction": 0.2, "hidden": HIDDEN, "epochs": 1,
            "lr": 0.1, "momentum": 0.9, "batch_size": 32, "eval_batch_size": 1024}
    d = tmp / f"flower-k{k}"
    (d / "ray").mkdir(parents=True)
    out = d / "rounds.json"
    env = dict(os.environ, VS_FLOWER_SPEC=json.dumps(spec), PYTHONPATH=str(ROOT / "bench"),
               FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(d / "ray"))
    argv = [str(vs_flower.bench_python()), str(ROOT / "bench" / "vs_flower.py"), "--flower-worker", str(out)]
    rc, wall, pss = measured(argv, d, env=env, log=d / "flower.log")
    if rc != 0 or not out.exists():
        sys.exit(f"Flower K={k} failed ({rc}); see {d / 'flower.log'}")
    return {"wall_s": wall, "pss": pss, "rounds": json.loads(out.read_text())}


def overhead_ms(res: Dict[str, Any]) -> float:
    """Median over rounds 2.. of max(0, round - training): the steady state (round 1 also pays each side's
    one-time start: Ray's actors, first-call warm-up)."""
    later = res["rounds"][1:] or res["rounds"]
    return 1e3 * statistics.median(max(0.0, r["round_s"] - r["train_s"]) for r in later)


def overhead_mean_ms(res: Dict[str, Any]) -> float:
    return 1e3 * statistics.mean(max(0.0, r["round_s"] - r["train_s"]) for r in res["rounds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--no-flower", action="store_true", help="hpcfl only")
    ap.add_argument("--install", action="store_true", help="create .bench-venv with Flower if missing")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    flower = not args.no_flower
    if flower and not vs_flower.has_flower(vs_flower.bench_python()):
        if not args.install:
            sys.exit(f"no Flower environment: {vs_flower.INSTALL_CMD} (or --install), or run with --no-flower")
        vs_flower.install()
    tmp = Path(tempfile.mkdtemp(prefix="hpcfl-scale-"))
    print(f"digits, MLP 64-{'-'.join(map(str, HIDDEN))}-10, {ROUNDS} rounds, 1 local epoch of SGD, K IID sites of 1 rank; "
          f"{os.cpu_count()} cores; hpcfl picks its slots, Flower runs K SuperNodes on Ray", flush=True)
    rows = []
    for k in args.ks:
        h = run_hpcfl(tmp, k)
        f = run_flower(tmp, k) if flower else None
        rows.append((k, h, f))
        line = (f"K={k:>3}: hpcfl {h['wall_s']:6.2f} s {h['pss'] / 2**30:5.2f} GiB ({h['slots']} slots, overhead "
                f"{overhead_ms(h):6.1f} ms/round, acc {h['rounds'][-1]['val_accuracy']:.4f})")
        if f:
            line += (f" | Flower {f['wall_s']:6.2f} s {f['pss'] / 2**30:5.2f} GiB (overhead {overhead_ms(f):7.1f} "
                     f"ms/round, acc {f['rounds'][-1]['val_accuracy']:.4f})")
        print(line, flush=True)
    print()
    head = "| K | slots | hpcfl wall s | hpcfl peak PSS GiB | hpcfl overhead ms/round (median; mean) | hpcfl acc |"
    sep = "|---|---|---|---|---|---|"
    if flower:
        head += (" Flower wall s | Flower peak PSS GiB | Flower overhead ms/round (median; mean) | Flower acc |"
                 " wall hpcfl/Flower | PSS hpcfl/Flower | overhead hpcfl/Flower (median) |")
        sep += "---|---|---|---|---|---|---|"
    print(head)
    print(sep)
    out = []
    for k, h, f in rows:
        cells = [str(k), str(h["slots"]), f"{h['wall_s']:.2f}", f"{h['pss'] / 2**30:.2f}",
                 f"{overhead_ms(h):.1f}; {overhead_mean_ms(h):.1f}", f"{h['rounds'][-1]['val_accuracy']:.4f}"]
        rec = {"k": k, "hpcfl": h}
        if f:
            cells += [f"{f['wall_s']:.2f}", f"{f['pss'] / 2**30:.2f}", f"{overhead_ms(f):.1f}; {overhead_mean_ms(f):.1f}",
                      f"{f['rounds'][-1]['val_accuracy']:.4f}", f"{h['wall_s'] / f['wall_s']:.3f}",
                      f"{h['pss'] / f['pss']:.3f}", f"{overhead_ms(h) / overhead_ms(f):.3f}"]
            rec["flower"] = f
        print("| " + " | ".join(cells) + " |")
        out.append(rec)
    if flower:
        ok_wall = all(h["wall_s"] <= f["wall_s"] / 3 for _, h, f in rows)
        ok_mem = all(h["pss"] <= f["pss"] for _, h, f in rows)
        ok_over = all(overhead_ms(h) <= overhead_ms(f) / 10 for _, h, f in rows)
        print(f"\ntargets: wall <= 1/3 of Flower's at every K: {'met' if ok_wall else 'NOT met'}; "
              f"peak PSS <= Flower's: {'met' if ok_mem else 'NOT met'}; "
              f"per-round overhead (median of rounds 2..) <= 1/10 of Flower's: {'met' if ok_over else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"(runs kept in {tmp})")


if __name__ == "__main__":
    main()
