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
TICKS = os.sysconf("SC_CLK_TCK")


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
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def proc_stat(pid: int) -> Optional[Dict[str, Any]]:
    """A process's session, state and CPU seconds (user + system) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()  # fields from the 3rd (state) on: the name may hold spaces
    return {"sid": int(f[3]), "cpu_s": (int(f[11]) + int(f[12])) / TICKS}


def proc_label(pid: int) -> str:
    """'rank N' for an MPI rank, 'worker N' for a torchrun worker, else the command's name."""
    try:
        env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    if "OMPI_COMM_WORLD_RANK" in env:
        return f"rank {env['OMPI_COMM_WORLD_RANK']}"
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env or "VS_PFL_WORKER_RANK" in env:
        return f"worker {env.get('RANK', env.get('VS_PFL_WORKER_RANK'))}"
    return name


class TreeWatch:
    """Samples a process tree every ``every`` s: peak PSS, and each process's last CPU seconds, session and
    lifetime (so the accounting survives processes that exit before the root)."""

    def __init__(self, root: int, every: float = 0.05):
        self.root, self.every = root, every
        self.peak = 0
        self.procs: Dict[int, Dict[str, Any]] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        now = time.perf_counter()
        self.peak = max(self.peak, tree_pss(self.root))
        for pid in tree_pids(self.root):
            st = proc_stat(pid)
            if st is None:
                continue
            p = self.procs.setdefault(pid, {"pid": pid, "label": "?", "first": now, "series": []})
            if not p["label"].startswith(("rank", "worker")) and len(p["series"]) < 100:
                p["label"] = proc_label(pid)  # again: a launcher's fork is seen before it execs the rank
            p.update(st, last=now)
            p["series"].append((time.time(), st["cpu_s"]))

    def table(self) -> List[Dict[str, Any]]:
        """Every process seen: label, session, CPU seconds, seconds alive, CPU share of its life."""
        out = []
        for p in self.procs.values():
            alive = max(p["last"] - p["first"], 1e-9)
            out.append({"pid": p["pid"], "label": p["label"], "sid": p["sid"], "cpu_s": p["cpu_s"],
                        "alive_s": alive, "cpu_share": p["cpu_s"] / alive, "series": p["series"]})
        return out


def cores_between(series: List[tuple], t0: float, t1: float) -> float:
    """The cores a process used on average between wall-clock times t0 and t1 (CPU seconds / seconds), from
    :class:`TreeWatch`'s samples (time.time(), CPU seconds); 0 where it did not live through the window."""
    inside = [(t, c) for t, c in series if t0 <= t <= t1]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def tree_pids(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo += _children(p)
    return out


def measured(argv: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, log: Optional[Path] = None,
             procs: Optional[List[Dict[str, Any]]] = None):
    """(exit code, wall seconds, peak PSS bytes of the process tree) of a command; ``procs``, when given,
    receives :meth:`TreeWatch.table`."""
    t = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = TreeWatch(proc.pid)
        watch.thread.start()
        rc = proc.wait()
        watch.done.set()
        watch.thread.join()
    if procs is not None:
        procs[:] = watch.table()
    return rc, time.perf_counter() - t, watch.peak


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
