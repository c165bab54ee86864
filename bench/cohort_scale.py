#!/usr/bin/env python
"""Does a federation's cost follow its cohort, not its number of sites? configs/sites-1000.yaml next to
configs/sites-10000.yaml (the same cohort of 50 sites of ~50 samples per round, balanced slots), in one run.

For each: rank 0's peak RSS (summary.json memory.peak_rss_mb: what must stay flat), its RSS before the
model arrived (imports, config, topology), the median round time and overhead over rounds 2.., the
evaluation rounds' time apart (eval.sites_every), peak PSS of the process tree, start-up (wall - rounds),
and the 10,000/1,000 ratios.

    .venv/bin/python bench/cohort_scale.py                 # 12 rounds each
    .venv/bin/python bench/cohort_scale.py --rounds 6 --sites 1000 10000 20000
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from scale_sites import measured  # noqa: E402


def run(tmp: Path, sites: int, rounds: int) -> Dict[str, Any]:
    name = f"sites{sites}"
    config = ROOT / "configs" / ("sites-10000.yaml" if sites >= 10000 else "sites-1000.yaml")
    argv = [sys.executable, "-m", "hpcfl", "launch", str(config), "--no-report", "--set", f"run.root={tmp}",
            "--set", f"run.name={name}", "--set", f"fl.rounds={rounds}", "--set", f"sites={{count: {sites}, ranks: 1}}",
            "--set", f"data.samples={63 * sites}", "--set", f"fl.sampling.fraction={50 / sites!r}",
            "--set", "observe.tensorboard=false"]
    rc, wall, pss = measured(argv, ROOT, log=tmp / f"{name}.log")
    if rc != 0:
        sys.exit(f"{name} failed ({rc}):\n{(tmp / f'{name}.log').read_text()[-3000:]}")
    recs = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    rounds_ = [x for x in recs if x["kind"] == "round"][1:]
    plain = [x for x in rounds_ if x.get("sites_evaluated", 0) == 0] or rounds_
    evals = [x for x in rounds_ if x.get("sites_evaluated", 0) > 0]
    summary = json.loads((tmp / name / "summary.json").read_text())
    mem = summary["memory"]
    return {"sites": sites, "wall_s": wall, "pss_mb": pss / 2**20, "rank0_peak_mb": mem["peak_rss_mb"],
            "rank0_before_model_mb": mem["rss_before_model_mb"],
            "round_ms": 1e3 * statistics.median(x["time"]["round_s"] for x in plain),
            "overhead_ms": 1e3 * statistics.median(x["time"]["overhead_s"] for x in plain),
            "straggler_ms": 1e3 * statistics.median(x["time"].get("straggler_s", 0.0) for x in plain),
            "eval_round_ms": 1e3 * statistics.median(x["time"]["round_s"] for x in evals) if evals else float("nan"),
            "startup_s": wall - sum(x["time"]["round_s"] for x in recs if x["kind"] == "round")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cohort-scale-") as tmp:
        res = [run(Path(tmp), k, args.rounds) for k in args.sites]
    cols = ["sites", "wall_s", "startup_s", "round_ms", "overhead_ms", "straggler_ms", "eval_round_ms",
            "rank0_peak_mb", "rank0_before_model_mb", "pss_mb"]
    print(f"cohort of 50 per round, {args.rounds} rounds, balanced slots; medians over rounds 2.. "
          "(evaluation rounds apart)")
    print("  ".join(f"{c:>21}" for c in cols))
    for r in res:
        print("  ".join(f"{r[c]:>21.1f}" if isinstance(r[c], float) else f"{r[c]:>21}" for c in cols))
    base = res[0]
    for r in res[1:]:
        print(f"{r['sites']}/{base['sites']}: " + ", ".join(
            f"{c} x{r[c] / base[c]:.2f}" for c in cols[1:] if base[c]))


if __name__ == "__main__":
    main()
