#!/usr/bin/env python
"""Per-round protocol overhead of hpcfl, next to its physical lower bound, in one run.

For MLPs of about 1M, 10M and 25M parameters and federations of 2, 4 and 8 sites
(``--sizes``, ``--sites``; one rank each), run a real federation under mpirun where local training is
one tiny step, and measure per round (rounds after the first):

  overhead = round wall time at rank 0 - slowest site's local training

next to the lower bound measured in this same process: copying the same
bytes in memory as many times as the protocol must move them (each of K sites
uploads one model and receives one: 2K model copies per round), best of 5, measured
just before and just after the run and averaged (on a shared machine the load moves). Also rank 0's
peak resident memory, expressed in model copies above what it held before
building the model: it must not grow with the number of sites.

``--eval off`` measures the protocol alone (issue 22's target: overhead without evaluation within 2x
the bound at 10-25M parameters): the sites' validation data is evaluated in the last round only
(eval.sites_every = rounds), no locally tuned or cross-site evaluation, and the steady rounds are
rounds 2..rounds-1; the table then adds where rank 0's round went (medians, ms): the wait for the
slots' uploads (their Reduce), FedAvg's division, the broadcast, the checkpoint's share.

Then the fast federation of the project's speed bar: configs/digits.yaml
(10 rounds, MLP, 2 sites of 1 rank), end to end, as a user runs it.

With ``--device cuda`` the sites' models live on the GPU: each round every site
receives the global model into device memory and its update leaves it, through
pinned host buffers (or directly, with CUDA-aware MPI). The bound then adds the
measured pinned copies (one host-to-device and one device-to-host per site).

    python bench/federation_overhead.py [--sizes 1,10,25] [--sites 2,4] [--rounds 6] [--device cuda] [--json F]
    python bench/federation_overhead.py --sizes 10,25 --sites 2,4 --eval off
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES = 256, 10


def hidden_for(params: float) -> int:
    """Width h of a 2-hidden-layer MLP 256 -> h -> h -> 10 with about `params` parameters."""
    a, b, c = 1.0, FEATURES + CLASSES + 3.0, CLASSES - params
    return int((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))


def memcpy_bound(nbytes: int, copies: int, repeats: int = 5) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(copies):
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return best


def pinned_bound(nbytes: int, sites: int, repeats: int = 5) -> float:
    """Seconds for ``sites`` host-to-device plus ``sites`` device-to-host copies of ``nbytes`` through pinned memory."""
    import torch

    n = nbytes // 4
    host = torch.empty(n, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(n, dtype=torch.float32, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(sites):
            dev.copy_(host, non_blocking=True)
            host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


BREAKDOWN = [("wait_upload_s", 13), ("aggregate_s", 9), ("send_s", 5), ("checkpoint_s", 11), ("upload_s", 12)]
EXTRA: list = []  # --set arguments every run gets (device, mpirun)


PROCS: List[dict] = []  # the last run's processes (bench/scale_sites.TreeWatch)


def run(cfg: str, root: Path, name: str, sets: list) -> tuple:
    sys.path.insert(0, str(ROOT / "bench"))
    from scale_sites import measured

    argv = [sys.executable, "-m", "hpcfl", "launch", cfg, "--no-report", "--set", f"run.root={root}",
            "--set", f"run.name={name}", "--set", "observe.tensorboard=false"]
    for s in EXTRA:
        argv += ["--set", s]
    for s in sets:
        argv += ["--set", s]
    log = root / f"{name}.log"
    rc, wall, _ = measured(argv, ROOT, log=log, procs=PROCS)
    if rc != 0:
        sys.exit(f"benchmark run {name} failed:\n{log.read_text()[-3000:]}")
    recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((root / name / "summary.json").read_text())
    return wall, [x for x in recs if x["kind"] == "round"], summary


def rank_cpu_ms(rounds: list) -> str:
    """CPU milliseconds (user + system) per steady round of rank 0 and of each slot, from the process samples:
    against the overhead they tell work (CPU) from waiting for a core or a peer."""
    from scale_sites import cores_between

    t0, t1 = rounds[0]["timestamp"], rounds[-1]["timestamp"]
    per = (t1 - t0) / max(1, len(rounds) - 1)
    ranks = sorted((p for p in PROCS if p["label"].startswith("rank ")), key=lambda p: int(p["label"].split()[1]))
    return " ".join(f"{1e3 * per * cores_between(p['series'], t0, t1):>6.0f}" for p in ranks)


def extra_sets(device: str, mpirun: Optional[str] = None) -> List[str]:
    """The --set arguments of every run: on a GPU all ranks share it (torch.distributed, NCCL)."""
    out = [f"train.device={device}"]
    if device == "cuda":
        out += ["site.backend=torch", "cluster.ranks_per_gpu=8"]
    if mpirun:
        out.append(f"launch.mpirun={mpirun}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10,25", help="model sizes in millions of parameters")
    ap.add_argument("--sites", default="2,4,8")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the sites' models live")
    ap.add_argument("--mpirun", help="launch.mpirun (e.g. the PyPI Open MPI wheel's)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--eval", choices=["on", "off"], default="on", help="off: the protocol alone (no evaluation "
                    "in the steady rounds), with rank 0's breakdown")
    args = ap.parse_args()
    EXTRA[:] = extra_sets(args.device, args.mpirun)
    rows = []
    sizes = [float(s) for s in args.sizes.split(",")]
    site_counts = [int(s) for s in args.sites.split(",")]

    off = args.eval == "off"
    if off and args.rounds < 4:
        sys.exit("--eval off needs --rounds 4 or more (rounds 2..rounds-1 are the steady ones)")
    print(f"{'params':>8} {'sites':>5} {'model MB':>9} {'overhead ms':>12} {'bound ms':>9} {'ratio':>6} "
          f"{'rank0 peak MB':>14} {'copies':>7}" + ("   wait_upload aggregate  send checkpoint  slot_upload"
                                                      "  CPU ms/round: rank 0, 1, ..." if off else ""))
    root = Path(tempfile.mkdtemp(prefix="hpcfl-bench-"))
    for size in sizes:
        h = hidden_for(size * 1e6)
        for k in site_counts:
            name = f"m{size:g}-s{k}"
            sets = ["data.name=synthetic", f"data.features={FEATURES}", f"data.classes={CLASSES}", "data.samples=512",
                    f"model.hidden=[{h}, {h}]", "fl.local_steps=1", "train.batch_size=8", "train.momentum=0",
                    f"fl.rounds={args.rounds}", f"checkpoint.every={args.rounds}", f"sites={{count: {k}, ranks: 1}}"]
            if off:
                sets += [f"eval.sites_every={args.rounds}", "eval.locally_tuned=false", "eval.cross_site=false"]
            nbytes = 4 * (FEATURES * h + h + h * h + h + h * CLASSES + CLASSES)
            before = memcpy_bound(nbytes, 2 * k)  # under a shared machine's load: measured on both sides of the run
            _, rounds, summary = run("configs/digits.yaml", root, name, sets)
            steady = rounds[1:-1] if off else rounds[1:]
            overhead = float(np.median([r["time"]["overhead_s"] for r in steady]))
            mem = summary["memory"]
            bound = (before + memcpy_bound(nbytes, 2 * k)) / 2
            if args.device == "cuda":
                bound += pinned_bound(nbytes, k)
            print(f"{size:>7g}M {k:>5} {mem['model_mb']:>9.1f} {overhead * 1e3:>12.1f} {bound * 1e3:>9.1f} "
                  f"{overhead / bound:>6.1f} {mem['peak_rss_mb']:>14.0f} {mem['model_copies_above_baseline']:>7.1f}"
                  + ("".join(f" {1e3 * float(np.median([r['time'].get(f, 0.0) for r in steady])):>{w}.1f}"
                             for f, w in BREAKDOWN) + "  " + rank_cpu_ms(rounds[:-1]) if off else ""), flush=True)
            rows.append({"params_m": size, "sites": k, "device": args.device, "model_mb": mem["model_mb"],
                         "overhead_ms": overhead * 1e3, "bound_ms": bound * 1e3, "ratio": overhead / bound,
                         "rank0_peak_mb": mem["peak_rss_mb"], "copies": mem["model_copies_above_baseline"]})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.device == "cuda" or off:
        return

    wall, rounds, _ = run("configs/digits.yaml", root, "digits", [])
    steady = rounds[1:]
    print(f"\ndigits (configs/digits.yaml: 10 rounds, MLP, 2 sites x 1 rank), end to end as `hpcfl launch`:")
    print(f"  wall time {wall:.2f} s (start-up included); median overhead per round "
          f"{np.median([r['time']['overhead_s'] for r in steady]) * 1e3:.2f} ms; median round "
          f"{np.median([r['time']['round_s'] for r in steady]) * 1e3:.1f} ms; final val_accuracy "
          f"{rounds[-1]['val_accuracy']:.4f}")
    print(f"(runs kept in {root})")


if __name__ == "__main__":
    main()
