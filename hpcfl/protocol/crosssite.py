"""Cross-site validation at the end of a run: every site's final local model and the global model,
each evaluated on every site's validation data (``cross_site.json`` and a printed table).

A model travels once, from its owner (rank 0 for the global model, the leader of
the slot that simulated the site for a local one) to every slot leader, then
inside every slot; each slot evaluates it on each of its sites' data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..comm import bcast_array, bcast_chunk
from .message import Message, per_site
from .records import EvalRow, Packed, by_site

log = logging.getLogger("hpcfl")


def bcast_flat(fed: Any, stager: Any, flat: Any, root: int) -> None:
    """Broadcast a (device) flat tensor over the federation communicator from ``root``."""
    if fed.Get_rank() == root:
        stager.send(flat, lambda buf: bcast_chunk(fed, buf, root))
    else:
        stager.receive(flat, lambda buf: bcast_chunk(fed, buf, root))


@dataclass
class Owners(Message):
    """Rank 0 -> every slot rank: the slot that holds each site's final local model (-1: none)."""

    slot: np.ndarray = per_site(int)


@dataclass
class HeldModels(Message):
    """Slot leader -> rank 0: the sites whose final local model this slot holds, and its round."""

    rounds: Dict[int, int]


@dataclass
class EvalRows(Message):
    """Slot leader -> rank 0: one model evaluated on this slot's share of the sites."""

    rows: List[EvalRow]


@dataclass
class CrossSiteSlot:
    """What a slot lends cross-site evaluation: explicit, so that it never reaches into the SlotWorker."""

    fed: Optional[Any]  # the federation communicator (the slot's leader), else None
    slot_comm: Optional[Any]  # the slot's ranks
    slot: int  # the slot's index
    sites: Sequence[Any]  # every site of the federation, by index
    ours: Sequence[Any]  # the sites whose validation data this slot evaluates on
    local_rounds: Dict[int, int]  # site -> round of its final local model, held by this slot
    local_models: Dict[int, np.ndarray]  # site -> that model (host)
    flat: Any  # the slot's model (a flat device tensor)
    load_host: Callable[[np.ndarray], None]  # host array -> flat
    share: Callable[[int], None]  # flat, from the federation rank ``root`` (leader), then inside the slot
    evaluate: Callable[[Any], np.ndarray]  # the metric sums of flat on a site's validation data
    restore_private: Callable[[int], None]  # a site's own entries into flat


class CrossSite:
    """Above ``eval.cross_site_max`` sites, the same on a seeded sample of that many sites
    (:func:`hpcfl.participation.cross_site_sites`): K x K evaluations would dominate the run."""

    @staticmethod
    def server(fed: Any, cfg: Any, names: Sequence[str], weights: np.ndarray, scratch: np.ndarray, task: Any,
               rundir: Any) -> None:
        """Rank 0: the global model (``weights``) and every local one (received into ``scratch``), evaluated
        everywhere; ``cross_site.json`` and the printed table."""
        from ..participation import cross_site_sites

        k = len(names)
        cs = cross_site_sites(cfg.eval, cfg.run.seed, k)
        owner, newest = np.full(k, -1, np.int64), np.zeros(k)
        for slot, held in enumerate(fed.gather(None, root=0)[1:]):
            for s, rnd in held.rounds.items():
                if rnd > newest[s]:  # balanced slots: the slot that trained it last holds it
                    owner[s], newest[s] = slot, rnd
        Owners.bcast((fed,), k, Owners(owner))
        has = owner >= 0
        models = ["global"] + [names[i] for i in cs if has[i]]
        table: Dict[str, Any] = {}
        for m in models:
            root = 0 if m == "global" else 1 + int(owner[names.index(m)])  # the owner's fed rank
            bcast_array(fed, weights if m == "global" else scratch, root=root, chunk_mb=cfg.launch.chunk_mb)
            rows = by_site([m.rows for m in fed.gather(None, root=0)[1:]], k, cs)
            table[m] = {names[i]: task.summarize(rows[i].vec.unpack()) for i in cs}
        _report(cfg, rundir, task, table, models, [names[i] for i in cs], [names[i] for i in cs if not has[i]], k)

    @staticmethod
    def slot(cfg: Any, side: CrossSiteSlot) -> None:
        from ..participation import cross_site_sites

        k = len(side.sites)
        names = [s.name for s in side.sites]
        cs = cross_site_sites(cfg.eval, cfg.run.seed, k)
        if side.fed is not None:
            side.fed.gather(HeldModels(dict(side.local_rounds)), root=0)
        owner = Owners.bcast((side.fed, side.slot_comm), k).slot
        global_copy = side.flat.clone()
        for m in ["global"] + [names[i] for i in cs if owner[i] >= 0]:
            i = None if m == "global" else names.index(m)
            if side.fed is not None and i is not None and int(owner[i]) == side.slot:
                side.load_host(side.local_models[i])
            side.share(0 if i is None else 1 + int(owner[i]))
            rows: List[Any] = []
            for site in side.ours:
                if i is None:
                    side.restore_private(site.index)
                rows.append(EvalRow(site.index, Packed.of(side.evaluate(site))))
            if side.fed is not None:
                side.fed.gather(EvalRows(rows), root=0)
        side.flat.copy_(global_copy)


def _report(cfg, rundir, task, table, models, cols, missing, k: int) -> None:
    key = task.headline[0] if task.headline else task.metrics[0]
    out = {"models": table, "no_local_model": missing, "metric_keys": list(task.metrics), "headline": key}
    if len(cols) < k:
        out["sampled"] = {"sites": len(cols), "of": k, "eval.cross_site_max": cfg.eval.cross_site_max}
    rundir.write_json(rundir.cross_site, out)
    text = _table(table, models, cols, key, missing) if len(cols) <= 16 else _summary(table, models, cols, key, k)
    log.info("%s", text)
    print(text, flush=True)


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
