"""The round protocol: what rank 0 and the site ranks do, round by round.

Per round r (sites already hold the global model w[r-1] and the round's plan):

  rank 0    plan: who is sampled, who drops out or misses the deadline  --Bcast (tiny)-->  all site ranks
  sites     the returning ones train w[r-1] -> local weights (Horovod inside the site),
            evaluate the local model on their own validation data (locally tuned)
  leaders   update d_s = w_s - w[r-1], filtered (exclude_vars, percentile, DP clipping),
            uploaded by the strategy's transport:
              mean rules    MPI Reduce of n_s * d_s (or of masked fixed-point integers with
                            secure aggregation): rank 0 holds one accumulator, whatever K
              coordinate    chunked Gather of the d_s: rank 0 holds K chunks, never K models
              select (Krum) chunked Gather for distances, then a Reduce of the kept sites
  rank 0    w[r] = strategy(mean or robust aggregate, + DP noise)   --Bcast-->  leaders  --Horovod-->  site ranks
  sites     evaluate w[r] on their validation data  --Gather-->  rank 0
  rank 0    sends the plan of round r+1 (or "stop"), then logs and checkpoints round r
            while the sites already train round r+1

So each global model crosses the network once, is evaluated where the data
lives, and the checkpoint overlaps the next round's training. A stop request
(SLURM's warning signal, ``hpcfl stop``) is answered at the next plan: the
round in progress finishes, rank 0 checkpoints it, and every rank exits cleanly.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import astuple
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import metrics as M
from .aggregation import strategy_for
from .checkpoint import save_checkpoint, write_npz_atomic
from .comm import (Comms, _chunks, bcast_array, gather_rows, quiet_barrier, recv_array, reduce_sum_array,
                   send_array)
from .config import Config, config_hash
from .errors import CheckpointError, RankFailure, TopologyError
from .model import Entry, layout_signature, state_views
from .participation import DROPOUT, RETURNS, STRAGGLER, Plan, plan_round, sample_size
from .report import Progress, round_records
from .rundir import RunDir

log = logging.getLogger("hpcfl")

# Rows gathered from the site leaders (float64). Index 0 of every gather is rank 0's dummy row.
UP = ["num_train", "steps", "train_s", "data_s", "compute_s", "allreduce_s", "update_norm", "unclipped"]
TIMES = ["recv_s", "site_bcast_s", "eval_s", "upload_s", "local_eval_s", "trained"]
STOP_FILE = "stop-requested"

# Set by the SIGUSR1 handler of rank 0 (runtime.py) or by a stop file: finish the round, checkpoint, exit.
_stop_signal = {"signum": None}


def request_stop(signum: Optional[int] = None, frame: Any = None) -> None:
    _stop_signal["signum"] = signum or -1


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maybe_fail(cfg: Config, rank: int, round_: int) -> None:
    """debug.inject_failure: make this rank fail at the start of a round, on purpose."""
    inj = cfg.debug.inject_failure
    if inj is None or inj.rank != rank or inj.round != round_:
        return
    log.warning("injecting failure (%s) at round %d", inj.mode, round_)
    if inj.mode == "kill":
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    raise RankFailure(f"injected failure at round {round_} (debug.inject_failure)")


def exchange_layout(comms: Comms, topology, flat_model=None):
    """Leaders tell rank 0 how the model is flattened; all leaders must agree.

    Returns the layout (entries) on rank 0, None elsewhere. Rank 0 never builds
    the model itself: it only needs the layout, so it never imports torch.
    """
    fed = comms.federation
    mine = None if flat_model is None else (flat_model.signature(), [tuple(astuple(e)) for e in flat_model.entries])
    got = fed.gather(mine, root=0)
    if fed.Get_rank() == 0:
        sig0, entries = got[1]
        bad = [topology.sites[i - 1].name for i in range(2, len(got)) if got[i][0] != sig0]
        verdict = (not bad, f"site(s) {', '.join(bad)} built a different model than site "
                            f"{topology.sites[0].name!r} (parameter names or shapes differ)")
    else:
        verdict = None
    ok, msg = fed.bcast(verdict, root=0)
    if not ok:
        raise TopologyError(msg)
    return [Entry(n, tuple(sh), o, k) for n, sh, o, k in entries] if fed.Get_rank() == 0 else None


class Control:
    """The per-round message from rank 0: stop flag, DP clip norm, and every site's participation code."""

    def __init__(self, k: int, vec: Optional[np.ndarray] = None):
        self.vec = np.zeros(3 + k) if vec is None else vec

    @classmethod
    def make(cls, plan: Optional[Plan], k: int, clip: float, stop: bool) -> "Control":
        c = cls(k)
        c.vec[0], c.vec[1], c.vec[2] = float(stop), float(plan.aggregate if plan else 0), clip
        if plan is not None:
            c.vec[3:] = plan.codes
        return c

    stop = property(lambda self: bool(self.vec[0]))
    aggregate = property(lambda self: bool(self.vec[1]))
    clip = property(lambda self: float(self.vec[2]))
    codes = property(lambda self: self.vec[3:].astype(np.int64))

    def returns(self) -> np.ndarray:
        return self.codes == RETURNS

    def masked(self) -> np.ndarray:
        return np.isin(self.codes, (RETURNS, DROPOUT, STRAGGLER))


def dp_noise_multiplier(dp) -> float:
    """The noise multiplier applied to the sum of updates (adaptive clipping spends part of z on the count)."""
    from .privacy.dp import split_noise

    if dp.adaptive and dp.noise_multiplier > 0:
        return split_noise(dp.noise_multiplier, dp.count_noise_multiplier)
    return dp.noise_multiplier


# ----------------------------------------------------------------------------------------------
# rank 0


class Aggregator:
    """Rank 0: holds the global model as a flat array, aggregates, logs and checkpoints. No torch."""

    def __init__(self, cfg: Config, topology, comms: Comms, rundir: RunDir, ckpt: Optional[Dict[str, Any]]):
        self.cfg, self.topology, self.comms, self.rundir = cfg, topology, comms, rundir
        self.k = len(topology.sites)
        self.rss_before_model = current_rss()
        self.ckpt = ckpt
        self.strategy = strategy_for(cfg.fl)
        self.rng = np.random.default_rng([cfg.run.seed, 29])  # server-side randomness (plans, DP noise)
        self.start_round = 1 if ckpt is None else int(ckpt["round"]) + 1
        meta = (ckpt or {}).get("state", {})
        self.best = meta.get("best")  # {"metric", "value", "round"}
        dp = cfg.privacy.dp
        self.clip = dp.clip_norm if dp else 0.0
        self.accountant = None
        if dp is not None:
            self.clip = float(meta.get("clip_norm", dp.clip_norm))
            if dp.noise_multiplier > 0:
                from .privacy.dp import Accountant

                q = sample_size(cfg.fl.sampling.fraction, cfg.fl.sampling.min_sites, self.k) / self.k
                self.accountant = Accountant(dp.noise_multiplier, q, dp.delta)
                if "accountant" in meta:
                    self.accountant.load_state_dict(meta["accountant"])
        self.last_records: List[Dict[str, Any]] = []
        self.checkpointed_round = self.start_round - 1

    def _initial_model(self) -> None:
        """The layout from the leaders; weights from the checkpoint, or the first site's seeded init."""
        self.entries = exchange_layout(self.comms, self.topology)
        self.signature = layout_signature(self.entries)
        n = sum(e.numel for e in self.entries)
        self.weights = np.empty(n, np.float32)
        ckpt = self.ckpt
        if ckpt is not None:
            if ckpt.get("signature") != self.signature:
                raise CheckpointError(f"{self.rundir.path}: its checkpoint holds a different model than the sites build")
            for name, view in state_views(self.weights, self.entries).items():
                view[...] = ckpt["model"][name]
            try:
                self.strategy.load_state_dict(ckpt.get("strategy", {}))
            except ValueError as exc:
                raise CheckpointError(f"{self.rundir.path}: the checkpoint's {self.cfg.fl.strategy} state: {exc}") from None
            self.rng.bit_generator.state = ckpt["rng"]
        self.comms.federation.Bcast(np.array([ckpt is None], np.int8), root=0)
        if ckpt is None:
            recv_array(self.comms.federation, self.weights, 1, self.cfg.launch.chunk_mb)  # site 0 leader's seeded init
        self.acc = np.zeros_like(self.weights)  # the one extra model-sized buffer rank 0 needs
        info = gather_rows(self.comms.federation, np.zeros(3))[1:]
        self.num_train, self.steps, self.num_classes = info[:, 0], info[:, 1].astype(int), int(info[0, 2])
        if self.cfg.privacy.secure_aggregation is not None:  # relay public keys; rank 0 never sees a secret
            keys = self.comms.federation.gather(None, root=0)
            self.comms.federation.bcast(keys[1:], root=0)

    # -- the per-round plan ------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        path = self.rundir.path / STOP_FILE
        if _stop_signal["signum"] is not None or path.exists():
            why = "a stop file" if path.exists() else f"signal {_stop_signal['signum']}"
            log.warning("stop requested (%s): finishing with a checkpoint after the last complete round", why)
            return True
        return False

    def send_control(self, round_: int) -> Control:
        cfg = self.cfg
        if self.stop_requested():
            ctl = Control.make(None, self.k, self.clip, stop=True)
            self.plan = None
        else:
            self.plan = plan_round(self.rng, cfg.fl, cfg.sites, self.steps, round_)
            ctl = Control.make(self.plan, self.k, self.clip, stop=False)
        self.comms.federation.Bcast(ctl.vec, root=0)
        return ctl

    # -- aggregation transports ----------------------------------------------------------------------
    def _aggregate(self, r: int, ctl: Control, up: np.ndarray) -> Dict[str, Any]:
        """Update self.weights from the uploads; returns what the round record should say about it."""
        from mpi4py import MPI

        cfg, fed, chunk = self.cfg, self.comms.federation, self.cfg.launch.chunk_mb
        back = ctl.returns()
        info: Dict[str, Any] = {}
        kind = self.strategy.kind
        dp = cfg.privacy.dp
        if kind == "mean" or kind == "select":
            keep = back
            if kind == "select":
                keep = self._krum_keep(back, up)
                fed.Bcast(keep.astype(np.float64), root=0)
                info["krum_kept"] = [self.topology.sites[i].name for i in np.flatnonzero(keep)]
            self.acc.fill(0.0)
            if cfg.privacy.secure_aggregation is not None:
                self._secure_sum(ctl)
            else:
                reduce_sum_array(fed, None, self.acc, chunk_mb=chunk)
            total = float(keep.sum()) if dp is not None else float(up[keep, UP.index("num_train")].sum())
            if dp is not None:
                info.update(self._dp_noise(ctl, up))
            np.divide(self.acc, np.float32(total), out=self.acc)
        else:  # coordinate-wise: chunked gather, K chunks at a time
            self.strategy.begin_round(int(back.sum()))
            n = up[back, UP.index("num_train")]
            for s, e in _chunks(self.weights.size, 4, chunk):
                buf = np.empty((fed.Get_size(), e - s), np.float32)
                fed.Gather(MPI.IN_PLACE, buf, root=0)
                self.strategy.aggregate_chunk(buf[1:][back], n, self.acc[s:e])
        self.strategy.finalize(self.acc, self.weights, r)
        return info

    def _krum_keep(self, back: np.ndarray, up: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        fed, chunk = self.comms.federation, self.cfg.launch.chunk_mb
        idx = np.flatnonzero(back)
        self.strategy.begin_round(len(idx))
        for s, e in _chunks(self.weights.size, 4, chunk):
            buf = np.empty((fed.Get_size(), e - s), np.float32)
            fed.Gather(MPI.IN_PLACE, buf, root=0)
            self.strategy.accumulate_distances(buf[1:][back])
        chosen = self.strategy.select(up[back, UP.index("num_train")])
        keep = np.zeros(self.k, bool)
        keep[idx[chosen]] = True
        return keep

    def _secure_sum(self, ctl: Control) -> None:
        """Sum masked fixed-point uploads chunk by chunk; remove the masks of sites that dropped."""
        from mpi4py import MPI

        from .privacy import secagg

        fed, bits = self.comms.federation, self.cfg.privacy.secure_aggregation.frac_bits
        pairs = [p for got in fed.gather(None, root=0)[1:] for p in (got or [])]  # survivors' seeds with the dropped
        for ci, (s, e) in enumerate(_chunks(self.weights.size, 8, self.cfg.launch.chunk_mb)):
            buf = np.zeros(e - s, np.uint64)
            fed.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
            if pairs:
                secagg.unmask_dropped_(buf, ci, pairs)
            secagg.decode(buf, bits, out=self.acc[s:e])

    def _dp_noise(self, ctl: Control, up: np.ndarray) -> Dict[str, Any]:
        """Gaussian noise on the sum of clipped updates; adaptive clip norm; the accountant's epsilon."""
        from .privacy import dp as D

        dp = self.cfg.privacy.dp
        back = ctl.returns()
        z = dp_noise_multiplier(dp)
        if z > 0:
            D.gaussian_noise_(self.acc, z * self.clip, self.rng)
        out = {"dp_clip_norm": self.clip, "dp_noise_multiplier": z,
               "dp_unclipped": int(up[back, UP.index("unclipped")].sum())}
        if dp.adaptive:
            frac = D.noisy_unclipped_fraction(out["dp_unclipped"], int(back.sum()),
                                              dp.count_noise_multiplier if dp.noise_multiplier > 0 else 0.0, self.rng)
            self.clip = D.adaptive_clip_update(self.clip, frac, dp.target_quantile, dp.clip_lr)
        if self.accountant is not None:
            self.accountant.step()
            out["dp_epsilon"] = self.accountant.epsilon()
            out["dp_delta"] = dp.delta
        else:
            out["dp_epsilon"] = float("inf")
        return out

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg, fed = self.cfg, self.comms.federation
        chunk = cfg.launch.chunk_mb
        names = [s.name for s in self.topology.sites]
        self._initial_model()
        progress = Progress(cfg, self.topology, self.rundir, self.start_round)
        t_prev = time.perf_counter()
        bcast_array(fed, self.weights, chunk_mb=chunk)  # initial (or resumed) global model
        last: Dict[str, Any] = {}
        ctl = self.send_control(self.start_round)
        stopped_after = None
        for r in range(self.start_round, cfg.fl.rounds + 1):
            if ctl.stop:
                stopped_after = r - 1
                break
            plan = self.plan
            maybe_fail(cfg, 0, r)
            t0 = time.perf_counter()
            quiet_barrier(fed)  # sleep, do not spin, while the sites train
            up = gather_rows(fed, np.zeros(len(UP)))[1:]
            t1 = time.perf_counter()
            agg_info = self._aggregate(r, ctl, up) if ctl.aggregate else {"skipped": True}
            t2 = time.perf_counter()
            bcast_array(fed, self.weights, chunk_mb=chunk)
            t3 = time.perf_counter()
            quiet_barrier(fed)  # ... and while they evaluate
            ev = gather_rows(fed, np.zeros(len(TIMES) + 2 * self.vec_size + 2))[1:]
            t4 = time.perf_counter()
            self.rng_state = self.rng.bit_generator.state  # what round r+1 resumes from: before its plan is drawn
            ctl = self.send_control(r + 1) if r < cfg.fl.rounds else Control(self.k)  # sites start round r+1 now
            server = {"wait_upload_s": t1 - t0, "aggregate_s": t2 - t1, "send_s": t3 - t2, "wait_eval_s": t4 - t3}
            records = round_records(r, self.topology, up, ev, UP, TIMES, server, self.num_classes, cfg.eval.auc_bins,
                                    plan.codes, names)
            summary = records[-1]
            summary.update(retries=plan.retries, sim_time_s=plan.sim_time_s, **agg_info)
            t5 = time.perf_counter()
            self._track_best(r, summary)  # best.npz: counted with the checkpoint
            if r % cfg.checkpoint.every == 0 or r == cfg.fl.rounds or ctl.stop:
                self.checkpoint(r, records)
            summary["time"]["checkpoint_s"] = time.perf_counter() - t5
            now = time.perf_counter()
            summary["time"]["round_s"] = now - t_prev
            summary["time"]["overhead_s"] = max(0.0, summary["time"]["round_s"] - summary["time"]["train_s"])
            t_prev = now
            self.rundir.append_metrics(records)
            progress.round_done(summary)
            last = summary
        else:
            if cfg.eval.cross_site:
                self._cross_site(names)
        if stopped_after is not None and self.checkpointed_round < stopped_after:
            self.checkpoint(stopped_after, self.last_records)
        out = progress.finish(last)
        if stopped_after is not None:
            out["stopped_after_round"] = stopped_after
            (self.rundir.path / STOP_FILE).unlink(missing_ok=True)
            progress._print(f"stopped after round {stopped_after} on request; the checkpoint is written: run the same "
                            f"command (or requeue the job) to resume")
        if self.best:
            out["best"] = self.best
        out["memory"] = self.memory()
        return out

    @property
    def vec_size(self) -> int:
        return M.vector_size(self.num_classes, self.cfg.eval.auc_bins)

    def _track_best(self, r: int, summary: Dict[str, Any]) -> None:
        key = self.cfg.eval.best_metric
        value = summary.get(key)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return
        better = self.best is None or (value < self.best["value"] if key == "val_loss" else value > self.best["value"])
        if better:
            self.best = {"metric": key, "value": float(value), "round": r}
            write_npz_atomic(self.rundir.path / "best.npz", {f"model/{k}": v for k, v in
                                                             state_views(self.weights, self.entries).items()},
                             {"round": r, "metric": key, "value": float(value), "signature": self.signature})
        summary["best"] = dict(self.best)

    def _cross_site(self, names: List[str]) -> None:
        """Every site's final local model and the global model, each evaluated on every site's validation data."""
        fed = self.comms.federation
        has = gather_rows(fed, np.zeros(1))[1:, 0].astype(bool)
        fed.Bcast(has.astype(np.float64), root=0)
        table: Dict[str, Any] = {}
        models = ["global"] + [n for n, h in zip(names, has) if h]
        for m in models:
            root = 0 if m == "global" else 1 + names.index(m)
            bcast_array(fed, self.weights if m == "global" else self.acc, root=root, chunk_mb=self.cfg.launch.chunk_mb)
            rows = gather_rows(fed, np.zeros(self.vec_size))[1:]
            table[m] = {site: M.summarize(rows[i], self.num_classes, self.cfg.eval.auc_bins) for i, site in enumerate(names)}
        missing = [n for n, h in zip(names, has) if not h]
        self.rundir.write_json("cross_site.json", {"models": table, "no_local_model": missing,
                                                   "metric_keys": ["accuracy", "loss", "auc", "balanced_accuracy", "recall"]})
        width = max(len(n) for n in ["model \\ data"] + models + names)
        lines = ["cross-site validation (accuracy; rows: model, columns: the validation data of a site):",
                 "  " + "model \\ data".ljust(width) + "".join(f"  {n:>{max(8, len(n))}}" for n in names)]
        for m in models:
            lines.append("  " + m.ljust(width) + "".join(
                f"  {table[m][n]['accuracy']:>{max(8, len(n))}.4f}" for n in names))
        if missing:
            lines.append(f"  (no local model: {', '.join(missing)} never trained since the run started)")
        text = "\n".join(lines)
        log.info("%s", text)
        print(text, flush=True)

    def memory(self) -> Dict[str, float]:
        """Rank 0's memory: FedAvg by Reduce must keep it at a constant number of model copies."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        model = self.weights.nbytes
        return {"model_mb": model / 2**20, "rss_before_model_mb": self.rss_before_model / 2**20,
                "peak_rss_mb": peak / 2**20, "model_copies_above_baseline": (peak - self.rss_before_model) / model,
                "strategy_model_copies": self.strategy.memory_copies()}

    def checkpoint(self, round_: int, records: List[Dict[str, Any]]) -> None:
        state: Dict[str, Any] = {"best": self.best, "clip_norm": self.clip}
        if self.accountant is not None:
            state["accountant"] = self.accountant.state_dict()
        save_checkpoint(self.rundir.checkpoints, round_, state_views(self.weights, self.entries), {
            "config_hash": config_hash(self.cfg),
            "signature": self.signature,
            "rng": self.rng_state,
            "records": records,
            "state": state,
        }, strategy=self.strategy.state_dict(), keep=self.cfg.checkpoint.keep)
        self.checkpointed_round = round_
        self.last_records = records


# ----------------------------------------------------------------------------------------------
# site ranks


class SiteWorker:
    """A site rank: trains data-parallel with its site; the leader also talks to rank 0."""

    def __init__(self, cfg: Config, topology, role, comms: Comms, trainer, start_round: int):
        from .privacy.exclude import exclude_slices

        self.cfg, self.topology, self.role, self.comms = cfg, topology, role, comms
        self.trainer = trainer
        self.start_round = start_round
        self.strategy = strategy_for(cfg.fl)
        self.k = len(topology.sites)
        self.me = role.site.index
        n = trainer.model.array.size
        self.scratch = np.empty(n, np.float32) if role.is_leader else None
        self.global_prev = np.empty(n, np.float32) if role.is_leader else None
        self.rundir_path = RunDir(cfg).path
        self.vec_size = M.vector_size(trainer.num_classes, cfg.eval.auc_bins)
        # exclude_vars: slices of the flat model this site never shares and keeps across rounds
        self.private_slices = exclude_slices(trainer.model.entries, cfg.privacy.exclude_vars) \
            if cfg.privacy.exclude_vars else []
        self.private: Optional[np.ndarray] = None
        self.final_local: Optional[np.ndarray] = None

    # -- site-private state (exclude_vars) ----------------------------------------------------------
    def _private_path(self, round_: int) -> Path:
        return self.rundir_path / "checkpoints" / f"site-{self.role.site.name}-private-round-{round_:06d}.npy"

    def _grab_private(self) -> None:
        a = self.trainer.model.array
        self.private = np.concatenate([a[s:e] for s, e in self.private_slices]) if self.private_slices else None

    def _restore_private(self) -> None:
        if self.private is None:
            return
        a, o = self.trainer.model.array, 0
        for s, e in self.private_slices:
            a[s:e] = self.private[o:o + e - s]
            o += e - s

    def _save_private(self, round_: int) -> None:
        if self.private is None or not self.role.is_leader:
            return
        p = self._private_path(round_)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.private)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        old = self._private_path(round_ - self.cfg.checkpoint.keep * self.cfg.checkpoint.every - 1)
        old.unlink(missing_ok=True)

    def _load_private(self) -> None:
        if not self.private_slices or self.start_round == 1:
            return
        p = self._private_path(self.start_round - 1)
        try:
            self.private = np.load(p)
        except OSError:
            raise CheckpointError(f"{p}: missing: site {self.role.site.name!r} cannot resume the parameters it keeps "
                                  f"private (privacy.exclude_vars)") from None

    def save_local_weights(self, round_: int) -> None:
        d = self.rundir_path / "debug"
        d.mkdir(exist_ok=True)
        np.save(d / f"round-{round_:06d}-rank-{self.role.rank:04d}.npy", self.trainer.model.array)

    def recv_control(self) -> Control:
        ctl = Control(self.k)
        if self.role.is_leader:
            self.comms.federation.Bcast(ctl.vec, root=0)
        if self.role.site.size > 1:
            self.comms.site.Bcast(ctl.vec, root=0)
        return ctl

    # -- upload ------------------------------------------------------------------------------------
    def _update(self, ctl: Control) -> Tuple[float, bool]:
        """This site's filtered update in self.scratch: d = w_local - w_global, then the privacy filters."""
        from .privacy import dp as D
        from .privacy.exclude import zero_slices
        from .privacy.percentile import percentile_filter

        pv = self.cfg.privacy
        d = np.subtract(self.trainer.model.array, self.global_prev, out=self.scratch)
        if self.private_slices:
            zero_slices(d, self.private_slices)
        if pv.percentile is not None:
            percentile_filter(d, pv.percentile.percent, pv.percentile.gamma, out=d)
        if pv.dp is not None:
            return D.clip_(d, ctl.clip)
        return D.l2_norm(d), False

    def _upload(self, r: int, ctl: Control, trained: bool) -> None:
        cfg, fed, chunk = self.cfg, self.comms.federation, self.cfg.launch.chunk_mb
        kind = self.strategy.kind
        d = self.scratch
        if not trained or not ctl.returns()[self.me]:
            d.fill(0.0)
        if kind in ("coordinate", "select"):
            for s, e in _chunks(d.size, 4, chunk):
                fed.Gather(d[s:e], None, root=0)
            if kind == "coordinate":
                return
            keep = np.zeros(self.k)
            fed.Bcast(keep, root=0)
            if not keep[self.me]:
                d.fill(0.0)
        weight = 1.0 if cfg.privacy.dp is not None else float(self.trainer.num_train)
        if cfg.privacy.secure_aggregation is not None:
            self._secure_upload(r, ctl, weight if ctl.returns()[self.me] else 0.0)
            return
        np.multiply(d, np.float32(weight), out=d)
        reduce_sum_array(fed, d, None, chunk_mb=chunk)

    def _secure_upload(self, r: int, ctl: Control, weight: float) -> None:
        from mpi4py import MPI

        from .privacy import secagg

        fed, bits = self.comms.federation, self.cfg.privacy.secure_aggregation.frac_bits
        masked, back = ctl.masked(), ctl.returns()
        me = self.me
        peers = {j: secagg.pair_seed(self.keypair, self.public_keys[j], r, me, j)
                 for j in np.flatnonzero(masked) if j != me} if back[me] else {}
        # A survivor reveals the seeds it shares with sites that dropped (SecAgg's recovery step).
        fed.gather([(me, j, seed) for j, seed in peers.items() if not back[j]], root=0)
        d = self.scratch
        n_sites = max(1, int(back.sum()))
        for ci, (s, e) in enumerate(_chunks(d.size, 8, self.cfg.launch.chunk_mb)):
            x = d[s:e] * np.float32(weight) if weight != 1.0 else d[s:e]
            enc = secagg.encode(x, bits, num_sites=n_sites) if back[me] else np.zeros(e - s, np.uint64)
            if back[me]:
                secagg.mask_(enc, ci, me, peers)
                if ci == 0 and self.cfg.debug.save_local_weights:  # what rank 0 receives from this site
                    np.save(self.rundir_path / "debug" / f"upload-round-{r:06d}-site-{me}.npy", enc)
            fed.Reduce(enc, None, op=MPI.SUM, root=0)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, role, fed = self.cfg, self.role, self.comms.federation
        tr = self.trainer
        chunk = cfg.launch.chunk_mb
        if role.is_leader:
            exchange_layout(self.comms, self.topology, tr.model)
            fresh = np.zeros(1, np.int8)
            fed.Bcast(fresh, root=0)
            if fresh[0] and role.site.index == 0:
                send_array(fed, tr.model.array, 0, chunk)  # the seeded initial weights (same on every site)
            gather_rows(fed, np.array([tr.num_train, tr.planned_steps(), tr.num_classes], float))
            if cfg.privacy.secure_aggregation is not None:
                from .privacy.secagg import Keypair

                self.keypair = Keypair.generate()  # secret: never leaves this process
                fed.gather(self.keypair.public_bytes(), root=0)
                self.public_keys = fed.bcast(None, root=0)
            bcast_array(fed, tr.model.array, chunk_mb=chunk)
        tr.receive_from_leader()
        self._grab_private()
        self._load_private()
        self._restore_private()
        ctl = self.recv_control()
        for r in range(self.start_round, cfg.fl.rounds + 1):
            if ctl.stop:
                break
            maybe_fail(cfg, role.rank, r)
            trained = bool(ctl.returns()[self.me])
            if role.is_leader:
                self.global_prev[...] = tr.model.array
            st = tr.train_round(r) if trained else None
            if cfg.debug.save_local_weights:
                self.save_local_weights(r)
            local_vec, local_eval_s = np.zeros(self.vec_size), 0.0
            if trained:
                self._grab_private()
                if cfg.eval.cross_site:
                    self.final_local = tr.model.array.copy()
                if cfg.eval.locally_tuned:
                    t = time.perf_counter()
                    local_vec = tr.evaluate()
                    local_eval_s = time.perf_counter() - t
            self._save_private(r)
            upload_s = recv_s = 0.0
            if role.is_leader:
                t0 = time.perf_counter()
                norm, clipped = self._update(ctl) if trained else (0.0, False)
                quiet_barrier(fed)  # sleep while slower sites train
                gather_rows(fed, np.array([tr.num_train, st.steps if st else 0, st.train_s if st else 0.0,
                                           st.data_s if st else 0.0, st.compute_s if st else 0.0,
                                           st.allreduce_s if st else 0.0, norm, float(trained and not clipped)]))
                if ctl.aggregate:
                    self._upload(r, ctl, trained)
                t1 = time.perf_counter()
                bcast_array(fed, tr.model.array, chunk_mb=chunk)
                upload_s, recv_s = t1 - t0, time.perf_counter() - t1
            site_bcast_s = tr.receive_from_leader()
            self._restore_private()
            t = time.perf_counter()
            totals = tr.evaluate(extra=(st.loss_sum, st.samples) if st else (0.0, 0.0))
            eval_s = time.perf_counter() - t
            log.info("round %d: %s, val acc %.4f", r,
                     f"trained {st.steps} steps in {st.train_s:.3f}s" if st else "did not take part",
                     totals[1] / max(totals[2], 1))
            if role.is_leader:
                ready = quiet_barrier(fed, wait=False)
                gather_rows(fed, np.concatenate([[recv_s, site_bcast_s, eval_s, upload_s, local_eval_s, float(trained)],
                                                 totals[:self.vec_size], local_vec, totals[self.vec_size:]]))
                ready.Wait()
            if r < cfg.fl.rounds:
                ctl = self.recv_control()
        else:
            if cfg.eval.cross_site:
                self._cross_site()

    def _cross_site(self) -> None:
        fed, tr = self.comms.federation, self.trainer
        names = [s.name for s in self.topology.sites]
        if self.role.is_leader:
            gather_rows(fed, np.array([float(self.final_local is not None)]))
            has = np.zeros(self.k)
            fed.Bcast(has, root=0)
            flags = np.array(has, float)
        else:
            flags = np.zeros(self.k)
        if self.role.site.size > 1:
            self.comms.site.Bcast(flags, root=0)
        global_copy = tr.model.array.copy()
        for m in ["global"] + [n for n, h in zip(names, flags) if h]:
            if self.role.is_leader:
                root = 0 if m == "global" else 1 + names.index(m)
                if m != "global" and root == fed.Get_rank():
                    tr.model.array[...] = self.final_local
                bcast_array(fed, tr.model.array, root=root, chunk_mb=self.cfg.launch.chunk_mb)
            tr.receive_from_leader()
            if m == "global":
                self._restore_private()
            vec = tr.evaluate()
            if self.role.is_leader:
                gather_rows(fed, vec)
        tr.model.array[...] = global_copy


__all__ = ["Aggregator", "SiteWorker", "request_stop", "STOP_FILE"]
