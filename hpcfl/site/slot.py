"""A slot: the ranks that train, one after another, every site assigned to them.

The slots' side of the round protocol (rank 0's is :class:`hpcfl.protocol.server.Aggregator`;
the exchanges and their order are in :mod:`hpcfl.protocol`). A slot holds ONE model and
ONE optimizer (in :class:`SiteTrainer`) and switches per-site state in place: each site
has its own data, training settings, the entries it keeps private (``exclude_vars`` and
what its task does not exchange), its final local model for cross-site validation and,
with secure aggregation, its own key pair. Everything a site decides is seeded from the
world ranks it would have with one slot per site, so the number of slots does not
change the result.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..atomic import write_atomic
from ..comm import send_array
from ..errors import CheckpointError
from ..privacy.filters import filter_update, is_finite, upload_filters
from ..protocol.control import ModelExchange, ParticipationExchange, PlanExchange, RowsExchange
from ..protocol.records import EvalRow, Packed, SiteInfo, SlotTimes, TrainRow
from ..protocol.server import LayoutExchange, maybe_fail
from ..protocol.transports import make_transport
from ..rundir import RunPaths
from .data import SiteRank
from .trainer import SiteSettings

log = logging.getLogger("hpcfl")


@dataclass
class SiteState:
    site: Any  # hpcfl.topology.Site
    rank: SiteRank
    data: Any  # SiteData
    settings: SiteSettings
    private: Optional[Any] = None  # the values of its private entries (a tensor on the device)
    final_local: Optional[np.ndarray] = None  # its last locally trained model (host), for cross-site validation


def private_names(cfg, task, entries) -> List[str]:
    """Entries a site keeps: those its task does not exchange, plus ``privacy.exclude_vars``."""
    from ..privacy.exclude import matched_names
    from ..tasks.base import matching

    names = [e.name for e in entries]
    exchanged = set(matching(names, task.exchanged()))
    keep = [n for n in names if n not in exchanged]
    if cfg.privacy.exclude_vars:
        keep += [n for n in matched_names(entries, cfg.privacy.exclude_vars) if n not in keep]
    return keep


class SlotWorker:
    def __init__(self, cfg, topology, role, comms, trainer, states: List[SiteState], start_round: int, run_dir: Path,
                 stager, heartbeat=None):
        self.cfg, self.topology, self.role, self.comms = cfg, topology, role, comms
        self.trainer, self.start_round = trainer, start_round
        self.paths = RunPaths(run_dir)
        self.stager, self.beat = stager, heartbeat
        self.sites = [s.site for s in states]
        self.states: Dict[int, SiteState] = {s.site.index: s for s in states}
        self.k = len(topology.sites)
        model = trainer.model
        self.strategy = trainer.strategy
        self.private_slices = model.slices(private_names(cfg, trainer.task, model.entries))
        self.filters = upload_filters(cfg, self.private_slices)
        n = model.numel
        self.global_ = model.flat.clone()  # the global model of the round, on the device
        lead = role.is_leader
        self.global_host = (self.global_.numpy() if model.array is not None else np.empty(n, np.float32)) if lead else None
        self.scratch = np.empty(n, np.float32) if lead else None
        self.transport = make_transport(cfg, self._strategy_kind(), n, topology) if lead else None
        self.mine = [s.index for s in self.sites]

    def _strategy_kind(self):
        return self.strategy

    @property
    def fed(self):
        return self.comms.federation if self.role.is_leader else None

    def _phase(self, what: str, r: int = 0, site: Optional[str] = None) -> None:
        if self.beat is not None:
            self.beat.phase(what, r, site)

    # -- per-site private entries -----------------------------------------------------------------------
    def grab_private(self, i: int) -> None:
        if self.private_slices:
            flat = self.trainer.model.flat
            self.states[i].private = self.trainer.torch.cat([flat[s:e] for s, e in self.private_slices]).clone()

    def restore_private(self, i: int) -> None:
        p = self.states[i].private
        if p is None:
            return
        flat, o = self.trainer.model.flat, 0
        for s, e in self.private_slices:
            flat[s:e] = p[o:o + e - s]
            o += e - s

    def _private_path(self, name: str, round_: int) -> Path:
        return self.paths.site_private(name, round_)

    def save_private(self, i: int, round_: int) -> None:
        st = self.states[i]
        if st.private is None or not self.role.is_leader:
            return
        arr = st.private.cpu().numpy()
        write_atomic(self._private_path(st.site.name, round_), lambda f: np.save(f, arr), error=CheckpointError,
                     what=f"site {st.site.name!r}'s private entries of round {round_}")
        old = self._private_path(st.site.name, round_ - self.cfg.checkpoint.keep * self.cfg.checkpoint.every - 1)
        old.unlink(missing_ok=True)

    def load_private(self, i: int) -> None:
        st = self.states[i]
        if not self.private_slices or self.start_round == 1:
            return
        p = self._private_path(st.site.name, self.start_round - 1)
        try:
            arr = np.load(p)
        except (OSError, ValueError):
            raise CheckpointError(f"{p}: missing or unreadable: site {st.site.name!r} cannot resume the entries it "
                                  "keeps private (privacy.exclude_vars, or state its task does not exchange)") from None
        st.private = self.trainer.torch.from_numpy(arr).to(self.trainer.device)

    # -- helpers ---------------------------------------------------------------------------------------
    def load_host(self, arr: np.ndarray) -> None:
        self.stager.from_host(arr, self.trainer.model.flat)

    def host_model(self, out: np.ndarray) -> np.ndarray:
        m = self.trainer.model
        if m.array is not None:
            return m.array
        return self.stager.to_host(m.flat, out)

    def evaluate(self, site, round_: int, extra=()) -> np.ndarray:
        st = self.states[site.index]
        return self.trainer.evaluate(site, round_, st.settings, st.data, extra)

    # -- set-up ----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        tr, fed = self.trainer, self.fed
        if fed is not None:
            LayoutExchange.slot(fed, tr.model)
            fresh = np.zeros(1, np.int8)
            fed.Bcast(fresh, root=0)
            if fresh[0] and self.role.slot.index == 0:  # the seeded initial weights (the same in every slot)
                send_array(fed, self.host_model(self.scratch), 0, self.cfg.launch.chunk_mb)
            fed.gather([SiteInfo(s.index, self.states[s.index].data.num_train,
                                 tr.planned_steps(self.states[s.index].settings, self.states[s.index].data),
                                 tr.eval_size) for s in self.sites], root=0)
            if self.cfg.privacy.secure_aggregation is not None:
                self.transport.slot_keys(fed, self.mine)
        ModelExchange.slot(fed, self.stager, tr.model.flat, tr.backend)
        self.global_.copy_(tr.model.flat)
        for i in self.mine:
            self.grab_private(i)
            self.load_private(i)

    # -- one site's local round ------------------------------------------------------------------------
    def _train_site(self, site, r: int, ctl) -> TrainRow:
        cfg, tr, st = self.cfg, self.trainer, self.states[site.index]
        flat = tr.model.flat
        flat.copy_(self.global_)
        self.restore_private(site.index)
        self._phase("train", r, site.name)
        stats = tr.train_round(site, st.rank.rank, r, st.settings, st.data)
        if cfg.debug.save_local_weights:
            self._save_local_weights(r, st)
        row = TrainRow(site=site.index, trained=True, num_train=st.data.num_train, steps=stats.steps,
                       train_s=stats.train_s, data_s=stats.data_s, compute_s=stats.compute_s,
                       allreduce_s=stats.allreduce_s)
        # the training sums of all the slot's ranks (loss, samples, the task's stats), in one tiny allreduce
        keys = sorted(stats.task)
        sums = tr.torch.tensor([stats.loss_sum, float(stats.samples)] + [stats.task[k] for k in keys],
                               dtype=tr.torch.float64, device=tr.device)
        tr.backend.allreduce_sum_(sums)
        sums = sums.cpu().numpy()
        row.loss_sum, row.samples = float(sums[0]), int(sums[1])
        row.task = {k: float(v) / max(row.samples, 1) for k, v in zip(keys, sums[2:])}
        self.grab_private(site.index)
        if cfg.eval.cross_site:
            st.final_local = self.host_model(np.empty(tr.model.numel, np.float32)).copy()
        if cfg.eval.locally_tuned:
            self._phase("evaluate local model", r, site.name)
            t = time.perf_counter()
            row.local_eval = Packed.of(self.evaluate(site, r))
            row.local_eval_s = time.perf_counter() - t
        if self.role.is_leader:
            self._upload_site(site, row, ctl)
        return row

    def _upload_site(self, site, row: TrainRow, ctl) -> None:
        """The site's filtered update d = w_local - w_global, added to this round's transport."""
        d = np.subtract(self.host_model(self.scratch), self.global_host, out=self.scratch)
        row.finite = is_finite(d)
        if not row.finite:
            return
        info = filter_update(self.filters, d, ctl.clip)
        row.update_norm, row.unclipped = info.norm, not info.clipped
        self.transport.add_site(site.index, d, self.strategy.upload_weight(row.num_train))
        if self.cfg.debug.save_local_weights and self.cfg.privacy.secure_aggregation is not None:
            self._save_masked(row, site)

    def _save_masked(self, row, site) -> None:
        """Debug: what rank 0 would receive if this site were alone in its slot (its masked encoding, chunk 0)."""
        from ..privacy import secagg

        t = self.transport
        peers = t.pairs.get(site.index, {})
        n = min(self.trainer.model.numel, max(1, (self.cfg.launch.chunk_mb << 20) // 8))
        w = self.strategy.upload_weight(row.num_train)
        x = self.scratch[:n] * np.float32(w) if w != 1.0 else self.scratch[:n]
        enc = secagg.encode(x, t.bits, num_sites=max(1, int(t.ctl.returns().sum())))
        secagg.mask_(enc, 0, site.index, peers)
        self.paths.debug.mkdir(exist_ok=True)
        np.save(self.paths.debug / f"upload-round-{t.round:06d}-site-{site.index}.npy", enc)

    def _save_local_weights(self, r: int, st: SiteState) -> None:
        self.paths.debug.mkdir(exist_ok=True)
        np.save(self.paths.local_weights(r, st.rank.rank), self.host_model(np.empty(self.trainer.model.numel, np.float32)))

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, role, tr = self.cfg, self.role, self.trainer
        slot_comm = self.comms.site
        self._setup()
        ctl = PlanExchange.slot(self.fed, slot_comm, self.k)
        for r in range(self.start_round, cfg.fl.rounds + 1):
            if ctl.stop:
                break
            maybe_fail(cfg, role.rank, r)
            back_planned = ctl.returns()
            if self.transport is not None:
                self.transport.begin_round(ctl, r)
            times = SlotTimes(slot=role.slot.index)
            rows: List[TrainRow] = []
            for site in self.sites:
                if back_planned[site.index]:
                    row = self._train_site(site, r, ctl)
                    times.train_s += row.train_s
                    times.eval_s += row.local_eval_s
                else:
                    row = TrainRow(site=site.index, num_train=self.states[site.index].data.num_train)
                    if cfg.debug.save_local_weights:  # what this site holds in a round it sits out
                        tr.model.flat.copy_(self.global_)
                        self.restore_private(site.index)
                        self._save_local_weights(r, self.states[site.index])
                rows.append(row)
                self.save_private(site.index, r)
            t0 = time.perf_counter()
            if role.is_leader:
                self._phase("upload", r)
                RowsExchange.slot(self.fed, rows)
                back = ParticipationExchange.slot(self.fed, self.k)
                if ctl.aggregate and back.any():
                    self._upload(back)
            t1 = time.perf_counter()
            self._phase("receive global model", r)
            times.recv_s, times.site_bcast_s = ModelExchange.slot(self.fed, self.stager, tr.model.flat, tr.backend)
            self.global_.copy_(tr.model.flat)
            if self.global_host is not None and tr.model.array is None:
                self.stager.to_host(self.global_, self.global_host)
            times.upload_s = t1 - t0
            evals = self._evaluate_global(r, times)
            log.info("round %d: trained %d of %d sites in %.3fs", r, sum(1 for x in rows if x.trained),
                     len(rows), times.train_s)
            if role.is_leader:
                self._phase("report evaluations", r)
                RowsExchange.slot(self.fed, (times, evals))
            if r < cfg.fl.rounds:
                self._phase("wait for the next plan", r)
                ctl = PlanExchange.slot(self.fed, slot_comm, self.k)
        else:
            if cfg.eval.cross_site:
                from ..protocol.crosssite import CrossSite

                self._phase("cross-site evaluation", cfg.fl.rounds)
                CrossSite.slot(self)
            self._end_of_run()

    def _end_of_run(self) -> None:
        """The task's last word on the final global model (e.g. MIL's attention maps), site by site, with
        each site's own entries; nothing for tasks that do not override Task.end_of_run."""
        from ..tasks.base import Task

        tr = self.trainer
        if type(tr.task).end_of_run is Task.end_of_run:
            return
        self._phase("end of run", self.cfg.fl.rounds)
        tr.model.flat.copy_(self.global_)
        tr.model.module.eval()
        for site in self.sites:
            st = self.states[site.index]
            self.restore_private(site.index)
            tr.task.end_of_run(tr.model.module, st.data, tr.context(site, self.cfg.fl.rounds, st.settings, st.data),
                               self.paths.path)

    def _evaluate_global(self, r: int, times: SlotTimes) -> List[EvalRow]:
        """The global model on each site's validation data: all sites at once where their models are the
        same (no private entries), else site by site with each site's own entries restored."""
        if not self.private_slices and len(self.sites) > 1:
            self._phase("evaluate global model", r)
            st0 = self.states[self.sites[0].index]
            t = time.perf_counter()
            vecs = self.trainer.evaluate_many(self.sites, r, st0.settings, [self.states[s.index].data
                                                                            for s in self.sites])
            dt = time.perf_counter() - t
            times.eval_s += dt
            return [EvalRow(s.index, Packed.of(v), dt / len(self.sites)) for s, v in zip(self.sites, vecs)]
        evals: List[EvalRow] = []
        for site in self.sites:
            self._phase("evaluate global model", r, site.name)
            self.restore_private(site.index)
            t = time.perf_counter()
            vec = self.evaluate(site, r)
            dt = time.perf_counter() - t
            times.eval_s += dt
            evals.append(EvalRow(site.index, Packed.of(vec), dt))
        return evals

    def _upload(self, back: np.ndarray) -> None:
        t = self.transport
        if t.kind == "mean":
            t.upload(self.fed, back)
        else:
            t.upload(self.fed, back, self.mine)
