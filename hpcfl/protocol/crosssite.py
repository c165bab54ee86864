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
    """Above ``eval.cross_site_max`` sites, the same on a seeded sample of that many sites
    (:func:`hpcfl.participation.cross_site_sites`): K x K evaluations would dominate the run."""

    @staticmethod
    def server(agg) -> None:
        from ..participation import cross_site_sites

        fed, names, k, cfg = agg.comms.federation, agg.names, agg.k, agg.cfg
        cs = cross_site_sites(cfg.eval, cfg.run.seed, k)
        owner, newest = np.full(k, -1.0), np.zeros(k)
        for slot, d in enumerate(fed.gather(None, root=0)[1:]):  # {site: round of its final local model}
            for s, rnd in d.items():
                if rnd > newest[s]:  # balanced slots: the slot that trained it last holds it
                    owner[s], newest[s] = slot, rnd
        fed.Bcast(owner, root=0)
        has = owner >= 0
        cols = [names[i] for i in cs]
        models = ["global"] + [names[i] for i in cs if has[i]]
        table: Dict[str, Any] = {}
        for m in models:
            root = 0 if m == "global" else 1 + int(owner[names.index(m)])  # the owner's fed rank
            bcast_array(fed, agg.weights if m == "global" else agg.acc, root=root, chunk_mb=cfg.launch.chunk_mb)
            rows = by_site(fed.gather(None, root=0)[1:], k, cs)
            table[m] = {names[i]: agg.task.summarize(rows[i].vec.unpack()) for i in cs}
        missing = [names[i] for i in cs if not has[i]]
        key = agg.task.headline[0] if agg.task.headline else agg.task.metrics[0]
        out = {"models": table, "no_local_model": missing, "metric_keys": list(agg.task.metrics), "headline": key}
        if len(cs) < k:
            out["sampled"] = {"sites": len(cs), "of": k, "eval.cross_site_max": cfg.eval.cross_site_max}
        agg.rundir.write_json("cross_site.json", out)
        text = _table(table, models, cols, key, missing) if len(cols) <= 16 else _summary(table, models, cols, key, k)
        log.info("%s", text)
        print(text, flush=True)

    @staticmethod
    def slot(worker) -> None:
        from ..participation import cross_site_sites

        fed, tr, role, cfg = worker.comms.federation, worker.trainer, worker.role, worker.cfg
        k = len(worker.topology.sites)
        names = worker.topology.names
        cs = cross_site_sites(cfg.eval, cfg.run.seed, k)
        owner = np.full(k, -1.0)
        if role.is_leader:
            fed.gather(dict(worker.final_round), root=0)
            fed.Bcast(owner, root=0)
        if role.slot.size > 1:
            worker.comms.site.Bcast(owner, root=0)
        flags = owner >= 0
        flat = tr.model.flat
        global_copy = flat.clone()
        mine = set(worker.mine)
        if worker.balanced:  # evaluated round-robin, as in the rounds
            ours = [worker.topology.sites[i] for i in cs[role.slot.index::len(worker.topology.slots)]]
        else:
            ours = [worker.topology.sites[i] for i in cs if i in mine]
        for m in ["global"] + [names[i] for i in cs if flags[i]]:
            i = None if m == "global" else names.index(m)
            if role.is_leader:
                root = 0 if i is None else 1 + int(owner[i])
                if i is not None and int(owner[i]) == role.slot.index:
                    worker.load_host(worker.final_local[i])
                bcast_flat(fed, worker.stager, flat, root)
            tr.backend.broadcast_(flat)
            rows: List[Any] = []
            for site in ours:
                if i is None:
                    worker.restore_private(site.index)
                rows.append(EvalRow(site.index, Packed.of(worker.evaluate(site, cfg.fl.rounds))))
            if role.is_leader:
                fed.gather(rows, root=0)
        flat.copy_(global_copy)


def _summary(table, models, cols, key: str, k: int) -> str:
    """A table too wide to print: each model's mean, min and max over the sampled sites' data."""
    lines = [f"cross-site validation ({key}) on {len(cols)} of {k} sites (eval.cross_site_max): each model on "
             "their validation data, mean [min, max] (all cells in cross_site.json):"]
    width = max(len(m) for m in models)
    for m in models:
        v = [table[m][c].get(key) for c in cols]
        v = [x for x in v if isinstance(x, (int, float))]
        if v:
            lines.append(f"  {m.ljust(width)}  {np.mean(v):.4f} [{min(v):.4f}, {max(v):.4f}]")
    return "\n".join(lines)


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
