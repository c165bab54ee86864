"""Cross-site validation at the end of a run: every site's final local model and the global model,
each evaluated on every site's validation data (``cross_site.json`` and a printed table).

A model travels once, from its owner (rank 0 for the global model, the leader of
the slot that simulated the site for a local one) to every slot leader, then
inside every slot; each slot evaluates it on each of its sites' data.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List

import numpy as np

from ..comm import bcast_array
from .records import EvalRow, Packed, by_site

log = logging.getLogger("hpcfl")


def bcast_flat(fed: Any, stager: Any, flat: Any, root: int) -> None:
    """Broadcast a (device) flat tensor over the federation communicator from ``root``."""
    if fed.Get_rank() == root:
        stager.send(flat, lambda buf: fed.Bcast(buf, root=root))
    else:
        stager.receive(flat, lambda buf: fed.Bcast(buf, root=root))


class CrossSite:
    @staticmethod
    def server(agg) -> None:
        fed, names, k = agg.comms.federation, agg.names, agg.k
        has = np.zeros(k, bool)
        for d in fed.gather(None, root=0)[1:]:
            for s, h in d.items():
                has[s] = h
        fed.Bcast(has.astype(np.float64), root=0)
        owner = {s.index: 1 + s.slot for s in agg.topology.sites}  # fed rank of the slot that owns a site
        models = ["global"] + [names[i] for i in range(k) if has[i]]
        table: Dict[str, Any] = {}
        for m in models:
            root = 0 if m == "global" else owner[names.index(m)]
            bcast_array(fed, agg.weights if m == "global" else agg.acc, root=root, chunk_mb=agg.cfg.launch.chunk_mb)
            rows = by_site(fed.gather(None, root=0)[1:], k)
            table[m] = {names[i]: agg.task.summarize(rows[i].vec.unpack()) for i in range(k)}
        missing = [n for n, h in zip(names, has) if not h]
        key = agg.task.headline[0] if agg.task.headline else agg.task.metrics[0]
        agg.rundir.write_json("cross_site.json", {"models": table, "no_local_model": missing,
                                                  "metric_keys": list(agg.task.metrics), "headline": key})
        text = _table(table, models, names, key, missing)
        log.info("%s", text)
        print(text, flush=True)

    @staticmethod
    def slot(worker) -> None:
        fed, tr, role = worker.comms.federation, worker.trainer, worker.role
        k = len(worker.topology.sites)
        names = worker.topology.names
        if role.is_leader:
            fed.gather({s.index: worker.states[s.index].final_local is not None for s in worker.sites}, root=0)
            flags = np.zeros(k)
            fed.Bcast(flags, root=0)
        else:
            flags = np.zeros(k)
        if role.slot.size > 1:
            worker.comms.site.Bcast(flags, root=0)
        flat = tr.model.flat
        global_copy = flat.clone()
        mine = {s.index for s in worker.sites}
        my_fed_rank = 1 + role.slot.index
        for m in ["global"] + [names[i] for i in range(k) if flags[i]]:
            i = None if m == "global" else names.index(m)
            if role.is_leader:
                root = 0 if i is None else 1 + worker.topology.sites[i].slot
                if i is not None and i in mine and root == my_fed_rank:
                    worker.load_host(worker.states[i].final_local)
                bcast_flat(fed, worker.stager, flat, root)
            tr.backend.broadcast_(flat)
            rows: List[Any] = []
            for site in worker.sites:
                if i is None:
                    worker.restore_private(site.index)
                rows.append(EvalRow(site.index, Packed.of(worker.evaluate(site, worker.cfg.fl.rounds))))
            if role.is_leader:
                fed.gather(rows, root=0)
        flat.copy_(global_copy)


def _table(table, models, names, key: str, missing) -> str:
    width = max(len(n) for n in ["model \\ data"] + models + names)
    lines = [f"cross-site validation ({key}; rows: model, columns: the validation data of a site):",
             "  " + "model \\ data".ljust(width) + "".join(f"  {n:>{max(8, len(n))}}" for n in names)]
    for m in models:
        cells = []
        for n in names:
            v = table[m][n].get(key)
            cells.append(f"  {v:>{max(8, len(n))}.4f}" if isinstance(v, (int, float)) else f"  {'-':>{max(8, len(n))}}")
        lines.append("  " + m.ljust(width) + "".join(cells))
    if missing:
        lines.append(f"  (no local model: {', '.join(missing)} never trained since the run started)")
    return "\n".join(lines)
