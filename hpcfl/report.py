"""Metrics records, the per-round progress line, and the end-of-run summary."""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

# Phases of a round, in the order they happen, with the label the summary prints.
PHASES = [
    ("send_s", "send global model (rank 0 -> leaders, MPI)"),
    ("site_bcast_s", "in-slot broadcast (site backend)"),
    ("train_s", "local training (slowest slot, its sites in turn)"),
    ("straggler_s", "  straggler: slowest slot - mean slot"),
    ("data_s", "  data loading wait"),
    ("compute_s", "  forward/backward/step"),
    ("allreduce_s", "  in-site gradient allreduce"),
    ("upload_s", "upload to rank 0 (MPI Reduce or Gatherv)"),
    ("aggregate_s", "aggregation"),
    ("eval_s", "evaluation (slowest slot)"),
    ("checkpoint_s", "checkpoint (rank 0's wait; written in the background)"),
    ("overhead_s", "overhead = round - training"),
    ("round_s", "round wall time"),
]


class Progress:
    """Rank 0's console output: one line per round, a summary at the end."""

    def __init__(self, cfg, topology, rundir, start_round: int, stream=None, headline=("accuracy", "loss")):
        self.cfg, self.topology, self.rundir = cfg, topology, rundir
        self.start_round = start_round
        self.out = stream or sys.stdout
        self.headline = tuple(headline)  # the task's metrics on the round line (val_<name> in the records)
        self.times: List[Dict[str, float]] = []
        self.t0 = time.perf_counter()
        shown = topology.sites[:8]
        sites = ", ".join(f"{s.name} x{s.size}" for s in shown) + (
            f", ... {len(topology.sites) - len(shown)} more" if len(topology.sites) > len(shown) else "")
        slots = len(getattr(topology, "slots", ())) or len(topology.sites)
        on = f" on {slots} slot{'' if slots == 1 else 's'}" if slots != len(topology.sites) else ""
        resumed = f", resuming after round {start_round - 1}" if start_round > 1 else ""
        self._print(f"hpcfl: {cfg.run.name}: {topology.world_size} ranks = aggregator + {len(topology.sites)} sites "
                    f"({sites}){on}, {cfg.fl.rounds} rounds{resumed}")
        from .observe import observers_for

        # TensorBoard / MLflow (cfg.observe); they see every record rank 0 appends to metrics.jsonl.
        self.observers = observers_for(cfg, rundir.path, start_round, warn=self._print)
        mp = getattr(rundir, "metrics_path", None)
        self._metrics_pos = mp.stat().st_size if mp is not None and mp.exists() else 0

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def round_done(self, s: Dict[str, Any], records: Optional[List[Dict[str, Any]]] = None) -> None:
        """Print the round's line and hand its metrics.jsonl records to the observers.

        Without ``records``, the observers get the lines appended to metrics.jsonl since the last call."""
        self._line(s)
        if self.observers:
            self.observers.records(records if records is not None else self._new_records())

    def _new_records(self) -> List[Dict[str, Any]]:
        import json

        mp = getattr(self.rundir, "metrics_path", None)
        if mp is None or not mp.exists():
            return []
        with open(mp, "rb") as f:
            f.seek(self._metrics_pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # complete lines only
        self._metrics_pos += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _line(self, s: Dict[str, Any]) -> None:
        t = s["time"]
        self.times.append(t)
        w = len(str(self.cfg.fl.rounds))
        sampled = s.get("sites_sampled", s["sites_total"])
        sites = (f"sites {s['sites_done']}/{s['sites_total']}" if sampled == s["sites_total"]
                 else f"sites {s['sites_done']}/{sampled} sampled of {s['sites_total']}")
        self._print(f"round {s['round']:>{w}}/{self.cfg.fl.rounds}  {sites}  "
                    + self._metrics(s) + "  "
                    + (f"eps {s['dp_epsilon']:.3g}  " if "dp_epsilon" in s else "")
                    + (f"best {s['best']['value']:.4f}@{s['best']['round']}  " if s.get("best") else "")
                    + f"{t['round_s']:.3f}s (train {t['train_s']:.3f}s, overhead {t['overhead_s'] * 1e3:.1f}ms)"
                    + (f"  dropped: {', '.join(f'{k} ({v})' for k, v in s['dropped'].items())}" if s.get("dropped") else "")
                    + ("  (too few returned: global model unchanged)" if s.get("skipped") else ""))

    def _metrics(self, s: Dict[str, Any], short: bool = True) -> str:
        abbrev = {"accuracy": "acc"} if short else {}
        cells = []
        for m in self.headline:
            v = s.get(f"val_{m}")
            cells.append(f"val_{abbrev.get(m, m)} " + (f"{v:.4f}" if isinstance(v, (int, float)) else "-"))
        for m in self.headline:  # eval.central_fraction: the held-out set, in the rounds it is evaluated
            v = s.get(f"central_{m}")
            if isinstance(v, (int, float)):
                cells.append(f"central_{abbrev.get(m, m)} {v:.4f}")
        return "  ".join(cells)

    def breakdown(self) -> Dict[str, Dict[str, float]]:
        """Mean seconds per round for each phase, over the rounds after the first of this launch
        (the first one also pays for start-up and warm-up) and for the first alone."""
        if not self.times:
            return {}
        steady = self.times[1:] or self.times
        return {
            "first_round": {k: float(self.times[0].get(k, 0.0)) for k, _ in PHASES},
            "mean_after_first": {k: float(np.mean([t.get(k, 0.0) for t in steady])) for k, _ in PHASES},
            "rounds_measured": len(steady),
        }

    def finish(self, last: Dict[str, Any]) -> Dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        bd = self.breakdown()
        summary = {"run_dir": str(self.rundir.path.resolve()), "rounds": self.cfg.fl.rounds,
                   "final": last, "time_breakdown": bd, "elapsed_s": elapsed}
        if bd:
            m, f = bd["mean_after_first"], bd["first_round"]
            self._print(f"\nwhere the time goes (seconds per round; mean of {bd['rounds_measured']} rounds after the first | first round):")
            width = max(len(label) for _, label in PHASES)
            for k, label in PHASES:
                self._print(f"  {label:<{width}} {m[k]:>9.4f} | {f[k]:.4f}")
        if last:
            self._print(f"\nfinal (round {last['round']}): " + self._metrics(last, short=False))
        self._print(f"run directory: {summary['run_dir']}  (metrics.jsonl, checkpoints/, logs/, manifest.json)")
        if self.observers:
            self.observers.finish(self.rundir.path)
            if self.cfg.observe.tensorboard:
                self._print(f"tensorboard --logdir {self.rundir.path / 'tb'}")
        return summary
