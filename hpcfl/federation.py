"""The round protocol: what rank 0 and the site ranks do, round by round.

Per round r (sites already hold the global model w[r-1]):

  sites     train w[r-1] -> local weights (Horovod inside the site)
  leaders   upload n_s * w_s  --MPI Reduce(sum)-->  rank 0       (+ tiny Gather: n_s, timings)
  rank 0    w[r] = sum / sum(n_s)                   (FedAvg, in place: no per-site copies)
  rank 0    --MPI Bcast-->  leaders  --Horovod broadcast-->  site ranks
  sites     evaluate w[r] on their validation data  --Gather-->  rank 0
  rank 0    log round r, checkpoint w[r]; sites already train round r+1 from w[r]

So each global model crosses the network once, is evaluated where the data
lives, and the checkpoint overlaps the next round's training.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import astuple
from typing import Any, Dict, List, Optional

import numpy as np

from .aggregation import make_strategy
from .checkpoint import save_checkpoint
from .comm import Comms, bcast_array, gather_rows, quiet_barrier, recv_array, reduce_sum_array, send_array
from .config import Config, config_hash
from .errors import CheckpointError, RankFailure, TopologyError
from .model import Entry, layout_signature, state_views
from .report import Progress, round_records
from .rundir import RunDir

log = logging.getLogger("hpcfl")

# Rows gathered from the site leaders (float64). Index 0 of every gather is rank 0's dummy row.
UP = ["num_train", "steps", "train_s", "data_s", "compute_s", "allreduce_s"]
EVAL = ["recv_s", "site_bcast_s", "eval_s", "upload_s", "val_loss_sum", "val_correct", "val_count",
        "train_loss_sum", "train_samples"]


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


class Aggregator:
    """Rank 0: holds the global model as a flat array, aggregates, logs and checkpoints. No torch."""

    def __init__(self, cfg: Config, topology, comms: Comms, rundir: RunDir, ckpt: Optional[Dict[str, Any]]):
        self.cfg, self.topology, self.comms, self.rundir = cfg, topology, comms, rundir
        self.rss_before_model = current_rss()
        self.ckpt = ckpt
        self.strategy = make_strategy(cfg.fl.strategy)
        self.rng = np.random.default_rng([cfg.run.seed, 29])  # server-side randomness (sampling, noise)
        self.start_round = 1 if ckpt is None else int(ckpt["round"]) + 1

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
            self.strategy.load_state_dict(ckpt.get("strategy", {}))
            self.rng.bit_generator.state = ckpt["rng"]
        self.comms.federation.Bcast(np.array([ckpt is None], np.int8), root=0)
        if ckpt is None:
            recv_array(self.comms.federation, self.weights, 1, self.cfg.launch.chunk_mb)  # site 0 leader's seeded init
        self.acc = np.zeros_like(self.weights)  # the one extra model-sized buffer rank 0 needs

    def run(self) -> Dict[str, Any]:
        cfg, fed = self.cfg, self.comms.federation
        chunk = cfg.launch.chunk_mb
        self._initial_model()
        progress = Progress(cfg, self.topology, self.rundir, self.start_round)
        t_prev = time.perf_counter()
        bcast_array(fed, self.weights, chunk_mb=chunk)  # initial (or resumed) global model
        last: Dict[str, Any] = {}
        for r in range(self.start_round, cfg.fl.rounds + 1):
            maybe_fail(cfg, 0, r)
            t0 = time.perf_counter()
            self.acc.fill(0.0)
            quiet_barrier(fed)  # sleep, do not spin, while the sites train
            reduce_sum_array(fed, None, self.acc, chunk_mb=chunk)
            up = gather_rows(fed, np.zeros(len(UP)))[1:]
            t1 = time.perf_counter()
            n_total = float(up[:, UP.index("num_train")].sum())
            self.strategy.finalize(self.acc, n_total, self.weights)
            t2 = time.perf_counter()
            bcast_array(fed, self.weights, chunk_mb=chunk)
            t3 = time.perf_counter()
            quiet_barrier(fed)  # ... and while they evaluate
            ev = gather_rows(fed, np.zeros(len(EVAL)))[1:]
            t4 = time.perf_counter()
            server = {"wait_upload_s": t1 - t0, "aggregate_s": t2 - t1, "send_s": t3 - t2, "wait_eval_s": t4 - t3}
            records = round_records(r, self.topology, up, ev, UP, EVAL, server)
            summary = records[-1]
            if r % cfg.checkpoint.every == 0 or r == cfg.fl.rounds:
                t5 = time.perf_counter()
                self.checkpoint(r, records)
                summary["time"]["checkpoint_s"] = time.perf_counter() - t5
            now = time.perf_counter()
            summary["time"]["round_s"] = now - t_prev
            summary["time"]["overhead_s"] = max(0.0, summary["time"]["round_s"] - summary["time"]["train_s"])
            t_prev = now
            self.rundir.append_metrics(records)
            progress.round_done(summary)
            last = summary
        out = progress.finish(last)
        out["memory"] = self.memory()
        return out

    def memory(self) -> Dict[str, float]:
        """Rank 0's memory: FedAvg by Reduce must keep it at a constant number of model copies."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        model = self.weights.nbytes
        return {"model_mb": model / 2**20, "rss_before_model_mb": self.rss_before_model / 2**20,
                "peak_rss_mb": peak / 2**20, "model_copies_above_baseline": (peak - self.rss_before_model) / model}

    def checkpoint(self, round_: int, records: List[Dict[str, Any]]) -> None:
        save_checkpoint(self.rundir.checkpoints, round_, state_views(self.weights, self.entries), {
            "config_hash": config_hash(self.cfg),
            "signature": self.signature,
            "rng": self.rng.bit_generator.state,
            "records": records,
        }, strategy=self.strategy.state_dict(), keep=self.cfg.checkpoint.keep)


class SiteWorker:
    """A site rank: trains data-parallel with its site; the leader also talks to rank 0."""

    def __init__(self, cfg: Config, topology, role, comms: Comms, trainer, start_round: int):
        self.cfg, self.topology, self.role, self.comms = cfg, topology, role, comms
        self.trainer = trainer
        self.start_round = start_round
        self.strategy = make_strategy(cfg.fl.strategy)
        self.scratch = np.empty_like(trainer.model.array) if role.is_leader else None
        self.rundir_path = RunDir(cfg).path

    def save_local_weights(self, round_: int) -> None:
        d = self.rundir_path / "debug"
        d.mkdir(exist_ok=True)
        np.save(d / f"round-{round_:06d}-rank-{self.role.rank:04d}.npy", self.trainer.model.array)

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
            bcast_array(fed, tr.model.array, chunk_mb=chunk)
        tr.receive_from_leader()
        for r in range(self.start_round, cfg.fl.rounds + 1):
            maybe_fail(cfg, role.rank, r)
            st = tr.train_round(r)
            if cfg.debug.save_local_weights:
                self.save_local_weights(r)
            upload_s = recv_s = 0.0
            if role.is_leader:
                t0 = time.perf_counter()
                self.strategy.contribution(tr.model.array, tr.num_train, out=self.scratch)
                ready = quiet_barrier(fed, wait=False)
                reduce_sum_array(fed, self.scratch, None, chunk_mb=chunk)
                ready.Wait()
                gather_rows(fed, np.array([tr.num_train, st.steps, st.train_s, st.data_s, st.compute_s,
                                           st.allreduce_s]))
                t1 = time.perf_counter()
                bcast_array(fed, tr.model.array, chunk_mb=chunk)
                upload_s, recv_s = t1 - t0, time.perf_counter() - t1
            site_bcast_s = tr.receive_from_leader()
            t = time.perf_counter()
            totals = tr.evaluate(extra=(st.loss_sum, st.samples))
            eval_s = time.perf_counter() - t
            log.info("round %d: trained %d steps in %.3fs, val acc %.4f", r, st.steps, st.train_s,
                     totals[1] / max(totals[2], 1))
            if role.is_leader:
                ready = quiet_barrier(fed, wait=False)
                gather_rows(fed, np.array([recv_s, site_bcast_s, eval_s, upload_s, *totals]))
                ready.Wait()
