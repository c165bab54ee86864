"""Metrics records, the per-round progress line, and the end-of-run summary."""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

# Phases of a round, in the order they happen, with the label the summary prints.
PHASES = [
    ("send_s", "send global model (rank 0 -> leaders, MPI)"),
    ("site_bcast_s", "in-site broadcast (Horovod)"),
    ("train_s", "local training (slowest site)"),
    ("data_s", "  data loading wait"),
    ("compute_s", "  forward/backward/step"),
    ("allreduce_s", "  in-site gradient allreduce"),
    ("upload_s", "upload to rank 0 (MPI Reduce + Gather)"),
    ("aggregate_s", "aggregation"),
    ("eval_s", "evaluation (slowest site)"),
    ("checkpoint_s", "checkpoint (overlaps next round's training)"),
    ("overhead_s", "overhead = round - training"),
    ("round_s", "round wall time"),
]


def round_records(round_: int, topology, up: np.ndarray, ev: np.ndarray, up_cols: Sequence[str],
                  ev_cols: Sequence[str], server: Dict[str, float]) -> List[Dict[str, Any]]:
    """metrics.jsonl records of one round: per site and split, then the round summary (last)."""
    U = {c: up[:, i] for i, c in enumerate(up_cols)}
    E = {c: ev[:, i] for i, c in enumerate(ev_cols)}
    recs: List[Dict[str, Any]] = []
    for i, site in enumerate(topology.sites):
        n_val = E["val_count"][i]
        recs.append({"kind": "site", "round": round_, "site": site.name, "split": "val", "model": "global",
                     "loss": float(E["val_loss_sum"][i] / max(n_val, 1)),
                     "accuracy": float(E["val_correct"][i] / max(n_val, 1)), "samples": int(n_val)})
        n_tr = E["train_samples"][i]
        recs.append({"kind": "site", "round": round_, "site": site.name, "split": "train", "model": "local",
                     "loss": float(E["train_loss_sum"][i] / max(n_tr, 1)), "samples": int(n_tr),
                     "steps": int(U["steps"][i]), "train_s": float(U["train_s"][i])})
    slow = int(np.argmax(U["train_s"]))  # the slowest site sets the pace
    n_val = E["val_count"].sum()
    time_ = {
        "send_s": server["send_s"],
        "site_bcast_s": float(E["site_bcast_s"].max()),
        "train_s": float(U["train_s"][slow]),
        "data_s": float(U["data_s"][slow]),
        "compute_s": float(U["compute_s"][slow]),
        "allreduce_s": float(U["allreduce_s"][slow]),
        "upload_s": float(E["upload_s"][slow]),
        "aggregate_s": server["aggregate_s"],
        "eval_s": float(E["eval_s"].max()),
        "checkpoint_s": 0.0,
        "wait_upload_s": server["wait_upload_s"],
        "wait_eval_s": server["wait_eval_s"],
    }
    recs.append({
        "kind": "round", "round": round_, "sites_done": len(topology.sites), "sites_total": len(topology.sites),
        "val_loss": float(E["val_loss_sum"].sum() / max(n_val, 1)),
        "val_accuracy": float(E["val_correct"].sum() / max(n_val, 1)),
        "num_train": int(U["num_train"].sum()), "timestamp": time.time(), "time": time_,
    })
    return recs


class Progress:
    """Rank 0's console output: one line per round, a summary at the end."""

    def __init__(self, cfg, topology, rundir, start_round: int, stream=None):
        self.cfg, self.topology, self.rundir = cfg, topology, rundir
        self.start_round = start_round
        self.out = stream or sys.stdout
        self.times: List[Dict[str, float]] = []
        self.t0 = time.perf_counter()
        sites = ", ".join(f"{s.name} x{s.size}" for s in topology.sites)
        resumed = f", resuming after round {start_round - 1}" if start_round > 1 else ""
        self._print(f"hpcfl: {cfg.run.name}: {topology.world_size} ranks = aggregator + {len(topology.sites)} sites "
                    f"({sites}), {cfg.fl.rounds} rounds{resumed}")

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def round_done(self, s: Dict[str, Any]) -> None:
        t = s["time"]
        self.times.append(t)
        w = len(str(self.cfg.fl.rounds))
        self._print(f"round {s['round']:>{w}}/{self.cfg.fl.rounds}  sites {s['sites_done']}/{s['sites_total']}  "
                    f"val_acc {s['val_accuracy']:.4f}  val_loss {s['val_loss']:.4f}  "
                    f"{t['round_s']:.3f}s (train {t['train_s']:.3f}s, overhead {t['overhead_s'] * 1e3:.1f}ms)")

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
            for k, label in PHASES:
                self._print(f"  {label:<46} {m[k]:>9.4f} | {f[k]:.4f}")
        if last:
            self._print(f"\nfinal (round {last['round']}): val_accuracy {last['val_accuracy']:.4f}  "
                        f"val_loss {last['val_loss']:.4f}")
        self._print(f"run directory: {summary['run_dir']}  (metrics.jsonl, checkpoints/, logs/, manifest.json)")
        return summary
