"""A slot: the ranks that train, one after another, every site assigned to them.

The slots' side of the round protocol (rank 0's is :class:`hpcfl.protocol.server.Aggregator`;
the exchanges and their order are in :mod:`hpcfl.protocol`: the per-round ones run at their points of
a round, :mod:`hpcfl.protocol.rounds`). A slot holds ONE model and
ONE optimizer (in :class:`SiteTrainer`) and switches per-site state in place: each site
has its own data, training settings, the entries it keeps private (``exclude_vars`` and
what its task does not exchange), its final local model for cross-site validation and,
with secure aggregation, its own key pair. Everything a site decides is seeded from the
world ranks it would have with one slot per site, so the number of slots does not
change the result.
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..atomic import write_atomic
from ..central import CentralEval
from ..errors import CheckpointError
from ..participation import NOT_SAMPLED, cross_site_sites, eval_sites
from ..privacy.dp import update_norm
from ..privacy.filters import filter_update, upload_filters
from ..protocol.control import ModelExchange, PlanExchange
from ..protocol.kinds import make_kind
from ..protocol.records import EvalRow, Packed, SiteInfo, SlotTimes, TrainRow
from ..protocol.rounds import (AFTER_AGGREGATION, AFTER_EVALUATION, AFTER_TRAINING, BEFORE_TRAINING, END_OF_RUN,
                               SlotRound, run_slot)
from ..protocol.server import maybe_fail
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


class SiteCache:
    """The sites a slot rank has data for: built on first use from the seeded partition, at most
    ``capacity`` kept (least recently used goes, its readers closed). Sites are data, not objects:
    a slot that simulates 5,000 sites holds the few it trains or evaluates now.

    What a site must keep between rounds lives outside it, bounded: its private entries
    (:class:`PrivateEntries`: only where its task or ``privacy.exclude_vars`` keeps some, one
    vector per site that ever trained, also saved with every checkpoint) and its final local
    model for cross-site validation (``SlotWorker.final_local``: only the sites cross-site
    validation covers, at most ``eval.cross_site_max``).
    """

    def __init__(self, make: Callable[[Any], SiteState], capacity: int = 256):
        self.make, self.capacity = make, max(1, capacity)
        self.kept: "OrderedDict[int, SiteState]" = OrderedDict()

    def __getitem__(self, site) -> SiteState:
        st = self.kept.get(site.index)
        if st is not None:
            self.kept.move_to_end(site.index)
            return st
        st = self.kept[site.index] = self.make(site)
        while len(self.kept) > self.capacity:
            self.kept.popitem(last=False)[1].data.close()
        return st

    def close(self) -> None:
        for st in self.kept.values():
            st.data.close()
        self.kept.clear()


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


class PrivateEntries:
    """Each site's private entries (``privacy.exclude_vars``, and what its task does not exchange): one vector
    per site that ever trained, on the device. The slots' one state across rounds: saved with every round, one
    file per site (``RunPaths.site_private``), and loaded on resume (:meth:`state_dict`, :meth:`load_state_dict`)."""

    def __init__(self, slices, torch, device, paths: RunPaths, keep_rounds: int):
        self.slices, self.torch, self.device = list(slices), torch, device
        self.paths, self.keep_rounds = paths, keep_rounds  # files older than keep_rounds go
        self.values: Dict[int, Any] = {}  # site -> the values of its private entries

    def __bool__(self) -> bool:
        return bool(self.slices)

    def grab(self, i: int, flat) -> None:
        if self.slices:
            self.values[i] = self.torch.cat([flat[s:e] for s, e in self.slices]).clone()

    def restore(self, i: int, flat) -> None:
        p = self.values.get(i)
        if p is None:
            return
        o = 0
        for s, e in self.slices:
            flat[s:e] = p[o:o + e - s]
            o += e - s

    def state_dict(self) -> Dict[int, np.ndarray]:
        return {i: p.cpu().numpy() for i, p in self.values.items()}

    def load_state_dict(self, state: Dict[int, np.ndarray]) -> None:
        for i, arr in state.items():
            self.values[i] = self.torch.from_numpy(arr).to(self.device)

    def save(self, sites: Dict[int, str], round_: int) -> None:
        """Round ``round_``'s file of every site in ``sites`` (index -> name) that has entries."""
        for i, arr in self.state_dict().items():
            if i not in sites:
                continue
            name = sites[i]
            write_atomic(self.paths.site_private(name, round_), lambda f: np.save(f, arr), error=CheckpointError,
                         what=f"site {name!r}'s private entries of round {round_}")
            self.paths.site_private(name, round_ - self.keep_rounds - 1).unlink(missing_ok=True)

    def load(self, sites: Dict[int, str], round_: int) -> None:
        """Resume: every site's entries as round ``round_`` saved them."""
        state: Dict[int, np.ndarray] = {}
        for i, name in sites.items():
            p = self.paths.site_private(name, round_)
            try:
                state[i] = np.load(p)
            except (OSError, ValueError):
                raise CheckpointError(f"{p}: missing or unreadable: site {name!r} cannot resume the entries it "
                                      "keeps private (privacy.exclude_vars, or state its task does not exchange)") from None
        self.load_state_dict(state)


class SlotWorker:
    def __init__(self, cfg, topology, role, comms, trainer, states: SiteCache, start_round: int, run_dir: Path,
                 stager, heartbeat=None):
        self.cfg, self.topology, self.role, self.comms = cfg, topology, role, comms
        self.trainer, self.start_round = trainer, start_round
        self.paths = RunPaths(run_dir)
        self.stager, self.beat = stager, heartbeat
        self.sites = [topology.sites[i] for i in role.slot.sites]
        self.states = states
        self.final_local: Dict[int, np.ndarray] = {}  # site -> its last locally trained model (host)
        self.k = len(topology.sites)
        self.cross_site = set(cross_site_sites(cfg.eval, cfg.run.seed, self.k).tolist()) if cfg.eval.cross_site else set()
        model = trainer.model
        self.strategy = trainer.strategy
        slices = model.slices(private_names(cfg, trainer.task, model.entries))
        self.private = PrivateEntries(slices, trainer.torch, trainer.device, self.paths,
                                      cfg.checkpoint.keep * cfg.checkpoint.every)
        self.filters = upload_filters(cfg, slices)
        n = model.numel
        self.global_ = model.flat.clone()  # the global model of the round, on the device
        lead = role.is_leader
        self.global_host = (self.global_.numpy() if model.array is not None else np.empty(n, np.float32)) if lead else None
        self.scratch = np.empty(n, np.float32) if lead else None
        self.kind = make_kind(cfg, self.strategy, n, topology) if lead else None  # the aggregation kind's slot half
        self.mine = [s.index for s in self.sites]
        self.mine_idx = np.asarray(self.mine, np.int64)
        self.balanced = cfg.launch.assign == "balanced"
        self.final_round: Dict[int, int] = {}  # site -> the round of its model in final_local
        self.flat_is_global = False  # the slot's model holds the round's global model, untouched since it came
        self.global_shared = False  # global_ IS rank 0's weights in the shared window (launch.shared_memory, CPU)
        if self.balanced and self.private:
            from ..errors import ConfigError

            raise ConfigError(f"launch.assign: balanced: task {cfg.task!r} keeps entries per site "
                              f"({len(slices)} slice(s) it does not exchange), which would stay in one "
                              "slot; use launch.assign: static")

    @property
    def fed(self):
        return self.comms.federation if self.role.is_leader else None

    def _phase(self, what: str, r: int = 0, site: Optional[str] = None) -> None:
        if self.beat is not None:
            self.beat.phase(what, r, site)

    # -- helpers ---------------------------------------------------------------------------------------
    def load_host(self, arr: np.ndarray) -> None:
        self.stager.from_host(arr, self.trainer.model.flat)

    def host_model(self, out: np.ndarray) -> np.ndarray:
        m = self.trainer.model
        if m.array is not None:
            return m.array
        return self.stager.to_host(m.flat, out)

    def evaluate(self, site, round_: int, extra=()) -> np.ndarray:
        st = self.states[site]
        return self.trainer.evaluate(site, round_, st.settings, st.data, extra)

    # -- set-up ----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        """The slots' halves of the start-up exchanges (:mod:`hpcfl.protocol.startup`), then the first model."""
        from ..protocol.startup import SlotStart, run_slot

        tr, fed = self.trainer, self.fed
        salt = self._key_salt() if self.cfg.privacy.secure_aggregation is not None else None  # every slot rank
        if fed is not None:
            run_slot(SlotStart(fed, self.cfg, self.role.slot.index, tr.model, lambda: self.host_model(self.scratch),
                               lambda: [self._info(s) for s in self.sites], self.kind, self.mine, salt))
            self.kind.share(fed)  # launch.shared_memory: the sums and the global model through shared memory
            self._global_in_window()
        ModelExchange.slot(fed, self.stager, tr.model.flat, tr.backend, self.window)
        if not self.global_shared:
            self.global_.copy_(tr.model.flat)
        self.flat_is_global = not self.private
        if self.private:  # every site starts from the seeded model's private entries (or its saved ones)
            for i in self.mine:
                self.private.grab(i, tr.model.flat)
            if self.start_round > 1:
                self.private.load({i: self.topology.sites[i].name for i in self.mine}, self.start_round - 1)

    def _global_in_window(self) -> None:
        """Shared memory: the round's global model is read where rank 0 keeps it (it changes it only after every
        slot has uploaded, and only reads it after the last round), so the leader holds no copy of its own."""
        if self.window is None:
            return
        self.global_host = self.window.segs[0]
        if self.trainer.model.array is not None:  # on the CPU the device copy is the same memory
            self.global_ = self.trainer.torch.from_numpy(self.global_host)
            self.global_shared = True

    def _close(self) -> None:
        """End of the run: the global model leaves the shared window before it goes."""
        if self.global_shared:
            self.global_, self.global_shared = self.global_.clone(), False
            self.global_host = self.global_.numpy()
        elif self.window is not None:  # a GPU leader: its host copy was rank 0's segment
            self.global_host = self.global_host.copy()
        if self.kind is not None:
            self.kind.close()

    def _key_salt(self) -> Optional[bytes]:
        """balanced + secure aggregation: any slot may train any site, so a site's key pair is derived from a
        secret every slot rank shares and rank 0 never sees (drawn by the first slot rank, sent over the
        slot ranks' communicator, which rank 0 is not part of)."""
        if not self.balanced:
            return None
        import os

        trainers = self.comms.trainers
        return trainers.bcast(os.urandom(32) if trainers.Get_rank() == 0 else None, root=0)

    def _info(self, site) -> SiteInfo:
        st = self.states[site]
        return SiteInfo(site.index, st.data.num_train, self.trainer.planned_steps(st.settings, st.data))

    # -- one site's local round ------------------------------------------------------------------------
    def _train_site(self, site, r: int, ctl) -> TrainRow:
        cfg, tr, st = self.cfg, self.trainer, self.states[site]
        flat = tr.model.flat
        if not self.flat_is_global:  # the round's first site starts from the model just received: no copy
            flat.copy_(self.global_)
        self.flat_is_global = False
        self.private.restore(site.index, tr.model.flat)
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
        self.private.grab(site.index, tr.model.flat)
        if site.index in self.cross_site:
            self.final_local[site.index] = self.host_model(np.empty(tr.model.numel, np.float32)).copy()
            self.final_round[site.index] = r
        if cfg.eval.locally_tuned:
            self._phase("evaluate local model", r, site.name)
            t = time.perf_counter()
            row.local_eval = Packed.of(self.evaluate(site, r))
            row.local_eval_s = time.perf_counter() - t
        if self.role.is_leader:
            self._upload_site(site, row, ctl)
        return row

    @property
    def window(self):
        """The leader's shared-memory window (launch.shared_memory), else None."""
        return self.kind.window if self.kind is not None else None

    def _upload_site(self, site, row: TrainRow, ctl) -> None:
        """The site's filtered update d = w_local - w_global, added to this round's aggregation kind."""
        local = self.host_model(self.scratch)
        if self.kind.fuses and not self.filters:  # one pass: difference, norm, weighting, sum
            norm = self.kind.add_difference(site.index, local, self.global_host,
                                            self.strategy.upload_weight(row.num_train))
            row.finite = math.isfinite(norm)
            if row.finite:
                row.update_norm, row.unclipped = norm, True
            return
        d = np.subtract(local, self.global_host, out=self.scratch)
        norm = update_norm(d)  # once: is it finite, and (no filters) the recorded update norm
        row.finite = math.isfinite(norm)
        if not row.finite:
            return
        info = filter_update(self.filters, d, ctl.clip, norm)
        row.update_norm, row.unclipped = info.norm, not info.clipped
        self.kind.add_site(site.index, d, self.strategy.upload_weight(row.num_train))
        if self.cfg.debug.save_local_weights and self.cfg.privacy.secure_aggregation is not None:
            self._save_masked(row, site)

    def _save_masked(self, row, site) -> None:
        """Debug: what rank 0 would receive if this site were alone in its slot (its masked encoding, chunk 0)."""
        enc = self.kind.masked_first_chunk(site.index, self.scratch, self.strategy.upload_weight(row.num_train))
        self.paths.debug.mkdir(exist_ok=True)
        np.save(self.paths.upload(self.kind.round, site.index), enc)

    def _save_local_weights(self, r: int, st: SiteState) -> None:
        self.paths.debug.mkdir(exist_ok=True)
        np.save(self.paths.local_weights(r, st.rank.rank), self.host_model(np.empty(self.trainer.model.numel, np.float32)))

    # -- the loop --------------------------------------------------------------------------------------
    def round_sites(self, ctl) -> List[Any]:
        """This slot's sites sampled into the round (those it trains or reports as dropped), in order."""
        slot_of = ctl.slot_of
        if slot_of is not None:  # launch.assign: balanced: whatever rank 0 dealt to this slot
            return [self.topology.sites[i] for i in np.flatnonzero(slot_of == self.role.slot.index)]
        codes = ctl.codes
        return [self.topology.sites[i] for i in self.mine_idx[codes[self.mine_idx] != NOT_SAMPLED]]

    def _train_sites(self, r: int, ctl, times: SlotTimes) -> List[TrainRow]:
        """Train the round's returning sites in turn; a row per sampled site (the cohort, not every site)."""
        cfg, tr = self.cfg, self.trainer
        back_planned = ctl.returns()
        rows: List[TrainRow] = []
        every = cfg.debug.save_local_weights and not self.balanced
        sampled = self.sites if every else self.round_sites(ctl)
        for site in sampled:
            if back_planned[site.index]:
                row = self._train_site(site, r, ctl)
                times.train_s += row.train_s
                times.eval_s += row.local_eval_s
                rows.append(row)
                continue
            if ctl.codes[site.index] != NOT_SAMPLED:
                rows.append(TrainRow(site=site.index, num_train=self.states[site].data.num_train))
            if cfg.debug.save_local_weights:  # what this site holds in a round it sits out
                tr.model.flat.copy_(self.global_)
                self.private.restore(site.index, tr.model.flat)
                self._save_local_weights(r, self.states[site])
        if self.private.values and self.role.is_leader:  # the entries every site keeps, with this round's checkpoint
            self.private.save({i: self.topology.sites[i].name for i in self.mine}, r)
        return rows

    def run(self) -> None:
        cfg = self.cfg
        self._setup()
        self.central = CentralEval.for_slot(self)
        ctl = PlanExchange.slot(self.fed, self.comms.site, self.k, self.balanced)
        for r in range(self.start_round, cfg.fl.rounds + 1):
            if ctl.stop:
                break
            maybe_fail(cfg, self.role.rank, r)
            self._round(r, ctl)
            if r < cfg.fl.rounds:
                self._phase("wait for the next plan", r)
                ctl = PlanExchange.slot(self.fed, self.comms.site, self.k, self.balanced)
        else:
            run_slot(END_OF_RUN, self._context(cfg.fl.rounds, ctl))
            self._end_of_run()
        self._close()

    def _context(self, r: int, ctl) -> SlotRound:
        """What the per-round exchanges' slot halves (:mod:`hpcfl.protocol.rounds`) read and fill in."""
        tr = self.trainer
        return SlotRound(self.fed, self.comms.site, self.cfg, r, ctl, self.role.slot.index, self.k, tr.model.flat,
                         self.stager, tr.backend, self._phase, SlotTimes(slot=self.role.slot.index),
                         cross_site=self._cross_site_side, window=self.window)

    def _round(self, r: int, ctl) -> None:
        """This slot rank's half of round ``r``: the registered exchanges at their points, training, the kind's
        upload, evaluation of the new global model."""
        lead, tr = self.role.is_leader, self.trainer
        s = run_slot(BEFORE_TRAINING, self._context(r, ctl))
        if self.kind is not None:
            self.kind.begin_round(ctl, r)
        s.rows = self._train_sites(r, ctl, s.times)
        t0 = time.perf_counter()
        if lead:
            self._phase("upload", r)
        run_slot(AFTER_TRAINING, s)  # the training report; which sites' updates count
        if lead and ctl.aggregate and s.back.any():
            self.kind.upload(self.fed, s.back, self.mine)
        t1 = time.perf_counter()
        self._phase("receive global model", r)
        run_slot(AFTER_AGGREGATION, s)  # the new global model
        if not self.global_shared:
            self.global_.copy_(tr.model.flat)
        self.flat_is_global = not self.private  # evaluation reads the model; private entries would change it
        if self.global_host is not None and tr.model.array is None and self.window is None:
            self.stager.to_host(self.global_, self.global_host)
        s.times.upload_s = t1 - t0
        s.evals = self._evaluate_global(r, s.times)
        s.central = self.central.evaluate(r, s.times) if self.central is not None else None  # eval.central_fraction
        log.info("round %d: trained %d of %d sampled sites in %.3fs", r, sum(1 for x in s.rows if x.trained),
                 len(s.rows), s.times.train_s)
        if lead:
            self._phase("report evaluations", r)
        run_slot(AFTER_EVALUATION, s)  # the evaluation report

    def _cross_site_side(self):
        """What this slot lends cross-site evaluation (:class:`hpcfl.protocol.crosssite.CrossSiteSlot`)."""
        from ..participation import cross_site_sites
        from ..protocol.crosssite import CrossSiteSlot, bcast_flat

        cfg, tr, role, sites = self.cfg, self.trainer, self.role, self.topology.sites
        cs = cross_site_sites(cfg.eval, cfg.run.seed, self.k)
        if self.balanced:  # evaluated round-robin, as in the rounds
            ours = [sites[i] for i in cs[role.slot.index::len(self.topology.slots)]]
        else:
            ours = [sites[i] for i in cs if i in set(self.mine)]

        def share(root: int) -> None:
            if self.fed is not None:
                bcast_flat(self.fed, self.stager, tr.model.flat, root)
            tr.backend.broadcast_(tr.model.flat)

        return CrossSiteSlot(self.fed, self.comms.site, role.slot.index, sites, ours, self.final_round,
                             self.final_local, tr.model.flat, self.load_host, share,
                             lambda site: self.evaluate(site, cfg.fl.rounds),
                             lambda i: self.private.restore(i, tr.model.flat))

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
            st = self.states[site]
            self.private.restore(site.index, tr.model.flat)
            tr.task.end_of_run(tr.model.module, st.data, tr.context(site, self.cfg.fl.rounds, st.settings, st.data),
                               self.paths.path)

    def eval_sites(self, r: int) -> List[Any]:
        """This slot's sites the global model of round ``r`` is evaluated on (eval.sites_every, sites_max)."""
        chosen = eval_sites(self.cfg.eval, self.cfg.run.seed, self.k, r, self.cfg.fl.rounds)
        if self.balanced:  # dealt round-robin: an equal share for every slot
            n = len(self.topology.slots)
            mine = chosen[self.role.slot.index::n]
        else:
            mine = chosen[np.isin(chosen, self.mine_idx)]
        return [self.topology.sites[i] for i in mine]

    def _evaluate_global(self, r: int, times: SlotTimes) -> List[EvalRow]:
        """The global model on the validation data of this round's evaluated sites: all at once where their
        models are the same (no private entries), else site by site with each site's own entries restored."""
        sites = self.eval_sites(r)
        if not self.private and len(sites) > 1:
            self._phase("evaluate global model", r)
            states = [self.states[s] for s in sites]
            t = time.perf_counter()
            vecs = self.trainer.evaluate_many(sites, r, states[0].settings, [st.data for st in states])
            dt = time.perf_counter() - t
            times.eval_s += dt
            return [EvalRow(s.index, Packed.of(v), dt / len(sites)) for s, v in zip(sites, vecs)]
        evals: List[EvalRow] = []
        for site in sites:
            self._phase("evaluate global model", r, site.name)
            self.private.restore(site.index, self.trainer.model.flat)
            t = time.perf_counter()
            vec = self.evaluate(site, r)
            dt = time.perf_counter() - t
            times.eval_s += dt
            evals.append(EvalRow(site.index, Packed.of(vec), dt))
        return evals
