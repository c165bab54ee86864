"""Central evaluation (``eval.central_fraction``): the global model on a held-out set that no site owns.

Why split it: with 10,000 sites the held-out set is the one number a user compares across runs, and one
rank evaluating all of it would make every evaluation round wait on that rank. So its batches (of
``train.eval_batch_size``, in index order) are dealt round-robin to the slots and, inside a slot, to its
ranks; each rank evaluates its batches one by one into a row per batch, the slot sums its rows over its
ranks (each row is non-zero on one rank only, so the sum is exact) and the leader sends them to rank 0,
which adds the rows in batch order. Every metric sum then receives the same additions in the same order
as one process evaluating the whole set batch after batch: the result is bit-identical to it
(tests/mpi/test_central_eval.py), whatever the number of slots and ranks.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np


def due(ev: Any, round_: int, rounds: int) -> bool:
    """Central evaluation runs in the rounds the sites' validation data is evaluated in."""
    return not (round_ % ev.sites_every) or round_ == rounds


def batches(held: np.ndarray, batch_size: int) -> list:
    """The held-out set's batches, in index order (what a single process would evaluate)."""
    return [held[b:b + batch_size] for b in range(0, len(held), batch_size)]


class _OneBatch:
    """A task's evaluation data holding one batch: ``task.evaluate`` then returns that batch's sums."""

    def __init__(self, x: Any, y: Any, num_classes: int):
        self.batch, self.num_classes = (x, y), num_classes

    def val_batches(self, batch_size: int):
        yield self.batch


class CentralEval:
    """A slot rank's share of the held-out set, and rank 0's sum of the slots' rows."""

    def __init__(self, worker: Any):
        cfg, role = worker.cfg, worker.role
        self.worker, self.cfg = worker, cfg
        first = worker.states[worker.sites[0]]
        self.shared, self.ctx_of = first.data.shared, (worker.sites[0], first)
        all_batches = batches(self.shared.held, cfg.train.eval_batch_size)
        n_slots = len(worker.topology.slots)
        self.rows = np.arange(role.slot.index, len(all_batches), n_slots)  # this slot's batches
        self.mine = {int(b): all_batches[b] for b in self.rows[role.rank_in_slot::role.slot.size]}

    @classmethod
    def for_slot(cls, worker: Any) -> Optional["CentralEval"]:
        return cls(worker) if worker.cfg.eval.central_fraction else None

    def evaluate(self, r: int, times: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(this slot's batch numbers, one row of metric sums per batch), summed over the slot's ranks."""
        if not due(self.cfg.eval, r, self.cfg.fl.rounds):
            return None
        tr, t = self.worker.trainer, time.perf_counter()
        self.worker._phase("central evaluation", r)
        module = tr.model.module
        module.eval()
        site, st = self.ctx_of
        ctx = tr.context(site, r, st.settings, st.data)
        out = np.zeros((len(self.rows), tr.task.eval_size(tr.spec)), np.float64)
        with tr.precision.autocast():
            for k, b in enumerate(self.rows):
                if int(b) in self.mine:
                    idx = tr.torch.from_numpy(self.mine[int(b)]).to(self.shared.x.device)
                    one = _OneBatch(self.shared.x[idx], self.shared.y[idx], int(self.shared.ds.num_classes))
                    out[k] = tr.task.evaluate(module, one, ctx)
        if len(out):
            totals = tr.torch.from_numpy(out).to(tr.device)
            tr.backend.allreduce_sum_(totals)  # one rank's row plus zeros: exact
            out = totals.cpu().numpy()
        times.eval_s += time.perf_counter() - t
        return self.rows, out


def total(parts: Sequence[Optional[Tuple[np.ndarray, np.ndarray]]], summarize: Callable[[np.ndarray], Dict[str, Any]],
          metrics: Sequence[str]) -> Dict[str, Any]:
    """Rank 0: the slots' rows added in batch order, summarised as ``central_<metric>`` (empty when not due)."""
    got = [p for p in parts if p is not None]
    if not got:
        return {}
    rows = np.concatenate([p[0] for p in got])
    n = len(rows)
    if sorted(rows.tolist()) != list(range(n)):
        raise RuntimeError(f"central evaluation: the slots sent batches {sorted(rows.tolist())[:8]}..., not 0..{n - 1} "
                           "(protocol out of step)")
    table = np.zeros((n, got[0][1].shape[1]), np.float64)
    for b, m in got:
        table[b] = m
    vec = np.zeros(table.shape[1], np.float64)
    for row in table:  # in batch order, one addition per batch: as one process accumulates
        vec += row
    out = summarize(vec)
    return {f"central_{k}": out[k] for k in (*metrics, "samples") if k in out}
