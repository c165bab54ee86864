"""What slots report to rank 0 each round: named rows, one per site, never columns matched by position.

Rows travel pickled (they are small: sums vectors are sent sparse, as most of a
site's score histogram is zeros) in one gather per phase. Rank 0 turns them
into metrics.jsonl records (:func:`round_records`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .message import Message


@dataclass
class Packed:
    """A float64 vector sent sparse when it is mostly zeros (exact: values are not rounded)."""

    size: int
    index: Optional[np.ndarray]  # None: dense
    values: np.ndarray

    @classmethod
    def of(cls, vec: Optional[np.ndarray]) -> Optional["Packed"]:
        if vec is None:
            return None
        vec = np.asarray(vec, np.float64)
        nz = np.flatnonzero(vec)
        if len(nz) * 3 < vec.size:
            return cls(vec.size, nz.astype(np.int32 if vec.size < 2**31 else np.int64), vec[nz])
        return cls(vec.size, None, vec.copy())

    def unpack(self) -> np.ndarray:
        if self.index is None:
            return self.values
        out = np.zeros(self.size, np.float64)
        out[self.index] = self.values
        return out


def unpack(p: Optional[Packed]) -> Optional[np.ndarray]:
    return None if p is None else p.unpack()


@dataclass
class SiteInfo(Message):
    """Once per launch: what rank 0 needs to know about a site before round 1."""

    site: int
    num_train: int
    steps: int  # planned local steps per round (simulated time, stragglers)

    @staticmethod
    def table(infos: Sequence["SiteInfo"]) -> np.ndarray:
        """A slot's infos as one (n, 3) int64 array (site, num_train, steps)."""
        return np.array([(i.site, i.num_train, i.steps) for i in infos], np.int64).reshape(-1, 3)

    @staticmethod
    def columns(tables: Sequence[Optional[np.ndarray]], k: int) -> np.ndarray:
        """The slots' tables as one (k, 3) array in site order; every site must have reported once."""
        out = np.full((k, 3), -1, np.int64)
        for t in tables:
            if t is not None and len(t):
                out[t[:, 0]] = t
        missing = np.flatnonzero(out[:, 0] < 0)
        if len(missing):
            raise RuntimeError(f"no report for sites {missing[:5].tolist()} (protocol out of step)")
        return out


@dataclass
class TrainRow(Message):
    """A site's local training in one round, as its slot leader saw it."""

    site: int
    trained: bool = False
    num_train: int = 0
    steps: int = 0
    train_s: float = 0.0
    data_s: float = 0.0
    compute_s: float = 0.0
    allreduce_s: float = 0.0
    loss_sum: float = 0.0  # summed over the slot's ranks
    samples: int = 0
    task: Dict[str, float] = field(default_factory=dict)  # the task's per-sample means
    update_norm: float = 0.0
    unclipped: bool = False  # DP: the update was within the clip norm
    finite: bool = True  # the update held no NaN/inf
    local_eval: Optional[Packed] = None  # locally tuned model on the site's validation data
    local_eval_s: float = 0.0


@dataclass
class EvalRow(Message):
    """The global model on a site's validation data, and where the slot's time went."""

    site: int
    vec: Packed
    eval_s: float = 0.0


@dataclass
class SlotTimes(Message):
    """Per slot and round: the transfer phases, and the slot's total training time (its sites in turn)."""

    slot: int
    train_s: float = 0.0
    upload_s: float = 0.0
    recv_s: float = 0.0
    site_bcast_s: float = 0.0
    eval_s: float = 0.0


@dataclass
class TrainReport(Message):
    """A slot's report after local training: a row per site sampled into the round."""

    rows: List[TrainRow]


@dataclass
class EvalReport(Message):
    """A slot's report after evaluating the new global model: its times and a row per evaluated site."""

    times: SlotTimes
    rows: List[EvalRow]
    central: Optional[Tuple[np.ndarray, np.ndarray]] = None  # eval.central_fraction: (batch numbers, sums)


def _finite(x: float):
    """metrics.jsonl is strict JSON: a diverged value is recorded as null, not NaN."""
    x = float(x)
    return x if np.isfinite(x) else None


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def by_site(rows: Sequence[Sequence[Any]], k: int, expect: Optional[Sequence[int]] = None) -> Dict[int, Any]:
    """Flatten the per-slot lists of rows gathered at rank 0 into one dict {site index: row}.

    ``expect``: the sites that must have reported (default: all ``k``); a round reports only the sites it
    sampled or evaluated, so its cost follows the cohort, not the number of sites."""
    out: Dict[int, Any] = {}
    for slot_rows in rows:
        for row in slot_rows or ():
            out[row.site] = row
    want = range(k) if expect is None else expect
    missing = [int(i) for i in want if int(i) not in out]
    if missing:
        raise RuntimeError(f"no report for sites {missing[:5]} (protocol out of step)")
    return out


def _site_records(round_: int, names: Sequence[str], train: Dict[int, TrainRow], evals: Dict[int, EvalRow],
                  codes: np.ndarray, summarize) -> List[Dict[str, Any]]:
    """Per site that reported (sampled into the round, or evaluated): split and model."""
    from ..participation import REASONS, RETURNS

    recs: List[Dict[str, Any]] = []
    for i in sorted(set(train) | set(evals)):
        name = names[i]
        status = "returned" if codes[i] == RETURNS else REASONS[int(codes[i])]
        if i in evals:
            recs.append({"kind": "site", "round": round_, "site": name, "split": "val", "model": "global",
                         "status": status, **summarize(evals[i].vec.unpack())})
        t = train.get(i)
        if t is None or not t.trained:
            continue
        if t.local_eval is not None:
            recs.append({"kind": "site", "round": round_, "site": name, "split": "val", "model": "local",
                         "status": status, **summarize(t.local_eval.unpack())})
        recs.append({"kind": "site", "round": round_, "site": name, "split": "train", "model": "local",
                     "loss": _finite(t.loss_sum / max(t.samples, 1)), "samples": int(t.samples),
                     "steps": int(t.steps), "train_s": float(t.train_s), "update_norm": float(t.update_norm),
                     **({"finite": False} if not t.finite else {}),
                     **{k: _finite(v) for k, v in t.task.items()}})
    return recs


def round_records(round_: int, names: Sequence[str], train: Dict[int, TrainRow], evals: Dict[int, EvalRow],
                  slots: Sequence[SlotTimes], server: Dict[str, float], codes: np.ndarray, summarize,
                  metric_names: Sequence[str]) -> List[Dict[str, Any]]:
    """metrics.jsonl records of one round: per site, split and model, then the round summary (last).

    ``summarize(vec) -> dict`` is the task's (pure NumPy); ``metric_names`` its scalar metrics,
    recorded in the summary as ``val_<name>`` (and ``local_val_<name>`` for locally tuned models).
    Only the sites sampled into the round or evaluated in it have records; the summary names the
    sites that returned and those sampled that did not, and counts the ones not sampled.
    """
    from ..participation import NOT_SAMPLED, REASONS, RETURNS

    recs = _site_records(round_, names, train, evals, codes, summarize)
    trained = [t for t in train.values() if t.trained]
    slow = max(trained, key=lambda t: t.train_s) if trained else None  # the slowest site that trained
    slot_train = max((s.train_s for s in slots), default=0.0)  # the slowest slot (its sites in turn)
    time_ = {
        "send_s": server["send_s"],
        "site_bcast_s": max((s.site_bcast_s for s in slots), default=0.0),
        "train_s": slot_train,
        "straggler_s": slot_train - float(np.mean([s.train_s for s in slots])) if slots else 0.0,
        "site_train_s": slow.train_s if slow else 0.0,
        "data_s": slow.data_s if slow else 0.0,
        "compute_s": slow.compute_s if slow else 0.0,
        "allreduce_s": slow.allreduce_s if slow else 0.0,
        "upload_s": max((s.upload_s for s in slots), default=0.0),
        "aggregate_s": server["aggregate_s"],
        "eval_s": max((s.eval_s for s in slots), default=0.0),
        "checkpoint_s": 0.0,
        "wait_upload_s": server["wait_upload_s"],
        "wait_eval_s": server["wait_eval_s"],
    }
    back = codes == RETURNS
    missing = np.flatnonzero((codes != RETURNS) & (codes != NOT_SAMPLED))
    summary: Dict[str, Any] = {
        "kind": "round", "round": round_, "sites_done": int(back.sum()), "sites_total": len(names),
        "sites_sampled": int((codes != NOT_SAMPLED).sum()), "sites_evaluated": len(evals),
        "participants": [names[i] for i in np.flatnonzero(back)],
        "dropped": {names[i]: REASONS[int(codes[i])] for i in missing},
        "not_sampled": int((codes == NOT_SAMPLED).sum()),
    }
    fed = summarize(np.sum([evals[i].vec.unpack() for i in sorted(evals)], axis=0)) if evals else {}
    for m in metric_names:
        summary[f"val_{m}"] = fed.get(m)
    summary.update({"num_train": int(sum(train[i].num_train for i in np.flatnonzero(back))),
                    "timestamp": time.time(), "time": time_})
    local = [train[i].local_eval.unpack() for i in sorted(train) if train[i].local_eval is not None]
    if local:
        loc = summarize(np.sum(local, axis=0))
        for m in metric_names:
            summary[f"local_val_{m}"] = loc.get(m)
    recs.append(summary)
    return recs
