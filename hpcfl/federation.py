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
from typing import Any, Dict, List, Optional

import numpy as np

from .aggregation import make_strategy
from .checkpoint import save_checkpoint
from .comm import Comms, bcast_array, gather_rows, reduce_sum_array
from .config import Config, config_hash
from .errors import RankFailure, TopologyError
from .model import FlatModel, build_model
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


def check_signatures(comms: Comms, signature: str, topology) -> None:
    """All leaders must flatten the model identically, or buffers would be misread."""
    sigs = comms.federation.gather(signature, root=0)
    if comms.federation.Get_rank() == 0:
        bad = [topology.sites[i - 1].name for i, s in enumerate(sigs) if i > 0 and s != signature]
        ok = not bad
        msg = f"site(s) {', '.join(bad)} built a different model than the aggregator (parameter names/shapes differ)"
    else:
        ok, msg = True, ""
    ok, msg = comms.federation.bcast((ok, msg), root=0)
    if not ok:
        raise TopologyError(msg)


class Aggregator:
    """Rank 0: holds the global model, aggregates, logs and checkpoints."""

    def __init__(self, cfg: Config, topology, comms: Comms, rundir: RunDir, meta: Dict[str, Any],
                 ckpt: Optional[Dict[str, Any]]):
        import torch

        self.cfg, self.topology, self.comms, self.rundir = cfg, topology, comms, rundir
        self.rss_before_model = current_rss()
        torch.manual_seed(cfg.run.seed)
        self.model = FlatModel(build_model(cfg, meta["num_features"], meta["num_classes"], tuple(meta["input_shape"])))
        self.strategy = make_strategy(cfg.fl.strategy)
        self.rng = np.random.default_rng([cfg.run.seed, 29])  # server-side randomness (sampling, noise)
        self.start_round = 1
        if ckpt is not None:
            self.model.module.load_state_dict(ckpt["model"])
            self.strategy.load_state_dict(ckpt.get("strategy", {}))
            self.rng.bit_generator.state = ckpt["rng"]["numpy"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.start_round = int(ckpt["round"]) + 1
        self.acc = np.zeros_like(self.model.array)  # the one extra model-sized buffer rank 0 needs

    def run(self) -> Dict[str, Any]:
        cfg, fed = self.cfg, self.comms.federation
        chunk = cfg.launch.chunk_mb
        check_signatures(self.comms, self.model.signature(), self.topology)
        progress = Progress(cfg, self.topology, self.rundir, self.start_round)
        t_prev = time.perf_counter()
        bcast_array(fed, self.model.array, chunk_mb=chunk)  # initial (or resumed) global model
        last: Dict[str, Any] = {}
        for r in range(self.start_round, cfg.fl.rounds + 1):
            maybe_fail(cfg, 0, r)
            t0 = time.perf_counter()
            self.acc.fill(0.0)
            reduce_sum_array(fed, None, self.acc, chunk_mb=chunk)
            up = gather_rows(fed, np.zeros(len(UP)))[1:]
            t1 = time.perf_counter()
            n_total = float(up[:, UP.index("num_train")].sum())
            self.strategy.finalize(self.acc, n_total, self.model.array)
            t2 = time.perf_counter()
            bcast_array(fed, self.model.array, chunk_mb=chunk)
            t3 = time.perf_counter()
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
        model = self.model.nbytes
        return {"model_mb": model / 2**20, "rss_before_model_mb": self.rss_before_model / 2**20,
                "peak_rss_mb": peak / 2**20, "model_copies_above_baseline": (peak - self.rss_before_model) / model}

    def checkpoint(self, round_: int, records: List[Dict[str, Any]]) -> None:
        import torch

        save_checkpoint(self.rundir.checkpoints, round_, {
            "config_hash": config_hash(self.cfg),
            "signature": self.model.signature(),
            "model": self.model.module.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng": {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state()},
            "records": records,
        }, keep=self.cfg.checkpoint.keep)


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
            check_signatures(self.comms, tr.model.signature(), self.topology)
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
                reduce_sum_array(fed, self.scratch, None, chunk_mb=chunk)
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
                gather_rows(fed, np.array([recv_s, site_bcast_s, eval_s, upload_s, *totals]))
