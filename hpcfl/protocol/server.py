"""Rank 0: the aggregator's side of the round protocol. It holds the global model as a flat
NumPy array, aggregates, logs and checkpoints; it never imports torch.

The slots' side is :class:`hpcfl.site.slot.SlotWorker`. Every exchange between the two
is a class in :mod:`hpcfl.protocol` with both halves side by side, in the order that
module's docstring gives: the start-up ones of :data:`hpcfl.protocol.startup.STARTUP`, the
per-round ones of :data:`hpcfl.protocol.rounds.ROUND` at their points of a round; the
aggregation itself is the kind's (:mod:`hpcfl.protocol.kinds`).
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..central import total as central_total
from ..checkpoint import save_checkpoint, write_npz_atomic
from ..config import Config, config_hash
from ..errors import CheckpointError, RankFailure
from ..model import state_views
from ..participation import NONFINITE, NOT_SAMPLED, RETURNS, plan_round
from ..privacy.server import run_strategy
from ..tasks import task_class
from ..topology import balance
from .control import Control, ModelExchange, PlanExchange
from .kinds import make_kind
from .records import round_records, strict
from .rounds import (AFTER_AGGREGATION, AFTER_EVALUATION, AFTER_TRAINING, BEFORE_TRAINING, END_OF_RUN, ServerRound,
                     run_server)
from .state import BestModel, ExtraState, GlobalModel, ServerRng, assemble, restore

log = logging.getLogger("hpcfl")
# Set by the SIGUSR1 handler of rank 0 (runtime.py) or by a stop file: finish the round, checkpoint, exit.
_stop_signal: Dict[str, Any] = {"signum": None}


def request_stop(signum: Optional[int] = None, frame: Any = None) -> None:
    _stop_signal["signum"] = signum or -1


def current_rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class BackgroundWrites:
    """Rank 0's writes of a round (best.npz, the checkpoint) in a thread, once the round before's are done:
    they overlap the slots' next round.

    Why: writing a model (zip CRC, SHA-256, the disk) took 0.1-0.3 s a round for 38 MB on 2 cores,
    all of it in rank 0's critical path; those calls release the GIL. The weights and the strategy's
    state they read change only in the next aggregation, which waits for them (:meth:`wait`), as do
    the end of the run and a stop. A write that fails raises there, in rank 0's thread.
    """

    def __init__(self) -> None:
        self.pending: List[Callable[[], Any]] = []  # this round's writes
        self._writer: Optional[threading.Thread] = None  # the writes of the round before, in progress
        self._error: Optional[BaseException] = None

    def start(self) -> None:
        self.wait()
        writes, self.pending = self.pending, []
        if not writes:
            return

        def run() -> None:
            try:
                for write in writes:
                    write()
            except BaseException as exc:  # noqa: BLE001 - re-raised by wait
                self._error = exc

        self._writer = threading.Thread(target=run, name="hpcfl-checkpoint", daemon=True)
        self._writer.start()

    @property
    def running(self) -> bool:
        return self._writer is not None

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def finish_quietly(self) -> None:
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - the error already raised is the one to report
            log.error("the checkpoint being written failed too: %s", exc)


@dataclass
class SiteStats:
    """What rank 0 knows of every site from start-up (:class:`hpcfl.protocol.startup.SiteInfoExchange`)."""

    num_train: np.ndarray  # (K,) float64: training samples
    steps: np.ndarray  # (K,) int64: planned local steps per round
    work: np.ndarray  # (K,) samples a site trains on per round: what balanced slots are dealt by

    @classmethod
    def of(cls, cfg: Config, info: np.ndarray, k: int) -> "SiteStats":
        """``info``: (K, 3) int64 site, num_train, steps (:meth:`SiteInfo.columns`)."""
        steps = info[:, 2].copy()
        batch = np.array([s.overrides.batch_size or cfg.train.batch_size for s in cfg.sites], np.float64)
        return cls(info[:, 1].astype(np.float64), steps, steps * batch)


class Aggregator:
    """Rank 0: holds the global model, runs the strategy through the aggregation kind, logs and checkpoints.

    Its state is its parts' (:mod:`hpcfl.protocol.state`): the global model, the strategy (and what its
    privacy wrapper keeps), the best model and the random stream; ``ckpt``, when resuming, is restored
    into them and emptied, so nothing keeps the loaded checkpoint's arrays alive."""

    def __init__(self, cfg: Config, topology, comms, rundir, ckpt: Optional[Dict[str, Any]]):
        self.cfg, self.topology, self.comms, self.rundir = cfg, topology, comms, rundir
        self.k, self.names = len(topology.sites), topology.names
        self.rss_before_model = current_rss()
        self.rng = ServerRng(cfg.run.seed)  # server-side randomness (plans, DP noise)
        self.strategy = run_strategy(cfg, self.k, self.rng.gen)  # DP-wrapped when asked: it owns clip, noise, accountant
        self.task = task_class(cfg.task)(cfg)
        key = best_metric(cfg, self.task)
        self.best = BestModel(key, key.removeprefix("val_") in self.task.minimize)
        self.start_round = 1 if ckpt is None else int(ckpt["round"]) + 1
        self.checkpointed_round = self.start_round - 1
        self.last_records: List[Dict[str, Any]] = []  # of the last checkpointed round
        self.model: Optional[GlobalModel] = None  # after start-up (the layout comes from the slots)
        self.sites: Optional[SiteStats] = None
        self.kind: Any = None  # the aggregation kind's rank 0 half
        self.plan: Any = None  # the round's plan (hpcfl.participation.Plan)
        self.heartbeat: Any = None
        self.writes = BackgroundWrites()
        self._config_hash: Optional[str] = None
        self._t_prev = 0.0
        self._restore: Optional[Dict[str, np.ndarray]] = None  # the checkpoint's model, until start-up
        if ckpt is not None:
            self._restore = ckpt["model"]
            restore(self.parts(), ckpt, self._bad_state)
            ckpt.clear()  # restored: the caller's reference no longer holds the arrays

    def parts(self) -> Dict[str, Any]:
        """What a checkpoint is assembled from (:data:`hpcfl.protocol.state.PLACES`), in the file's order."""
        parts = {"model": self.model, "strategy": self.strategy, "best": self.best,
                 "extra": ExtraState(self.strategy), "rng": self.rng}
        return {k: v for k, v in parts.items() if v is not None}

    def _bad_state(self, part: str, exc: Exception) -> None:
        raise CheckpointError(f"{self.rundir.path}: the checkpoint's {self.cfg.fl.strategy} {part} state: "
                              f"{exc}") from None

    @property
    def clip(self) -> float:
        return self.strategy.upload_clip()

    # -- set-up ---------------------------------------------------------------------------------------
    def _initial_model(self) -> None:
        """The start-up exchanges (:mod:`hpcfl.protocol.startup`): the layout from the leaders, weights from the
        checkpoint or slot 0's seeded init, every site's report, secure aggregation's keys."""
        from .startup import ServerStart, run_server

        start = ServerStart(self.comms.federation, self.cfg, self.k, self._restore, str(self.rundir.path))
        self._restore = None
        start = run_server(start)
        self.model = GlobalModel(start.entries, start.weights)
        self.sites = SiteStats.of(self.cfg, start.sites, self.k)
        self.kind = make_kind(self.cfg, self.strategy, self.model.weights.size, self.topology)
        moved = self.kind.share(self.comms.federation, self.model.weights)
        if moved is not None:  # launch.shared_memory: the slots copy the global model from where it lives
            self.model.weights, self.model.window = moved, self.kind.window

    # -- the per-round plan ---------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        path = self.rundir.stop_file
        if _stop_signal["signum"] is not None or path.exists():
            why = "a stop file" if path.exists() else f"signal {_stop_signal['signum']}"
            log.warning("stop requested (%s): finishing with a checkpoint after the last complete round", why)
            return True
        return False

    def _stop_pending(self) -> bool:
        return _stop_signal["signum"] is not None or self.rundir.stop_file.exists()

    def send_plan(self, round_: int) -> Control:
        balanced = self.cfg.launch.assign == "balanced"
        if self.stop_requested():
            self.plan = None
            ctl = Control.make(None, self.k, self.clip, stop=True, slots=np.full(self.k, -1) if balanced else None)
        else:
            self.plan = plan_round(self.rng.gen, self.cfg.fl, self.cfg.sites, self.sites.steps, round_)
            ctl = Control.make(self.plan, self.k, self.clip, stop=False,
                               slots=self.assign(self.plan) if balanced else None)
        return PlanExchange.server(self.comms.federation, ctl)

    def assign(self, plan) -> np.ndarray:
        """launch.assign: balanced: the round's sampled sites dealt to the slots by estimated work (samples a
        site trains on per round: local steps x batch size; 0 for one that will not return), longest first."""
        sampled = np.flatnonzero(plan.codes != NOT_SAMPLED)
        work = np.where(plan.codes[sampled] == RETURNS, self.sites.work[sampled], 0.0)
        out = np.full(self.k, -1, np.int64)
        out[sampled] = balance(work, len(self.topology.slots))
        return out

    # -- aggregation ----------------------------------------------------------------------------------
    def _aggregate(self, r: int, back: np.ndarray, train) -> Dict[str, Any]:
        """Update self.weights from the uploads; returns what the round record says about it."""
        m = self.model
        return self.kind.update(self.comms.federation, self.strategy, back, self.sites.num_train, m.acc, m.weights,
                                r, train)

    # -- the loop -------------------------------------------------------------------------------------
    def _phase(self, what: str, r: int) -> None:
        if self.heartbeat is not None:
            self.heartbeat.phase(what, r)

    def run(self, progress, heartbeat=None) -> Dict[str, Any]:
        cfg, fed = self.cfg, self.comms.federation
        self.heartbeat = heartbeat
        self._initial_model()
        self._t_prev = time.perf_counter()
        ModelExchange.server(fed, self.model.weights, cfg.launch.chunk_mb, self.model.window)  # initial (or resumed)
        ctl = self.send_plan(self.start_round)
        try:
            stopped_after, last = self._rounds(ctl, progress)
        except BaseException:
            self.writes.finish_quietly()  # a complete checkpoint of the round before, for the resume
            raise
        shared = self.model.window is not None
        if shared:  # the window goes with the run: the weights stay readable
            self.model.weights, self.model.window = self.model.weights.copy(), None
        self.kind.close()
        out = progress.finish(last)
        out["shared_memory"] = shared  # launch.shared_memory: whether the models moved through it
        if stopped_after is not None:
            out["stopped_after_round"] = stopped_after
            self.rundir.stop_file.unlink(missing_ok=True)
            progress._print(f"stopped after round {stopped_after} on request; the checkpoint is written: run the same "
                            f"command (or requeue the job) to resume")
        if self.best.best:
            out["best"] = self.best.best
        out["memory"] = self.memory()
        return out

    def _rounds(self, ctl: Control, progress):
        """The rounds, the cross-site evaluation, and every checkpoint on disk; returns (stopped after, last)."""
        cfg = self.cfg
        last: Dict[str, Any] = {}
        stopped_after = None
        for r in range(self.start_round, cfg.fl.rounds + 1):
            if ctl.stop:
                stopped_after = r - 1
                break
            maybe_fail(cfg, 0, r, before=self.writes.wait)
            maybe_hold(cfg, r, before=self.writes.wait, beat=self._phase, stop=self._stop_pending)
            ctl, records = self._round(r, ctl)
            last = records[-1]
            progress.round_done(last, records)
            if self.heartbeat is not None:
                self.heartbeat.round_done(r, last["time"]["round_s"])
        else:
            run_server(END_OF_RUN, self._context(cfg.fl.rounds, ctl))
        if stopped_after is not None and self.checkpointed_round < stopped_after:
            self.checkpoint(stopped_after, self.last_records)
            self.writes.start()
        self.writes.wait()
        return stopped_after, last

    def _context(self, r: int, ctl: Control) -> ServerRound:
        """What the per-round exchanges' rank 0 halves (:mod:`hpcfl.protocol.rounds`) read and fill in."""
        return ServerRound(self.comms.federation, self.cfg, r, ctl, self.names, self.model, self.task, self.rundir,
                           self._phase)

    def _round(self, r: int, ctl: Control):
        """Rank 0's half of round ``r`` (the order of :mod:`hpcfl.protocol`; the registered exchanges at their
        points, :mod:`hpcfl.protocol.rounds`); returns (next plan, the round's records, its summary last)."""
        cfg, plan, s = self.cfg, self.plan, self._context(r, ctl)
        run_server(BEFORE_TRAINING, s)
        self._phase("wait for uploads", r)
        t0 = time.perf_counter()
        run_server(AFTER_TRAINING, s)  # the training reports; which sites' updates count
        t1 = time.perf_counter()
        self._phase("aggregate", r)
        self.writes.wait()  # the previous round's checkpoint reads the weights this changes
        agg_info = self._aggregate(r, s.back, s.train) if ctl.aggregate and s.back.any() else {"skipped": True}
        t2 = time.perf_counter()
        run_server(AFTER_AGGREGATION, s)  # the new global model, to every slot
        t3 = time.perf_counter()
        self._phase("wait for evaluations", r)
        run_server(AFTER_EVALUATION, s)  # the evaluation reports
        t4 = time.perf_counter()
        self.rng.mark()  # what round r+1 resumes from: before its plan is drawn
        nxt = self.send_plan(r + 1) if r < cfg.fl.rounds else Control.idle(self.k, cfg.launch.assign == "balanced")  # slots start round r+1 now
        server = {"wait_upload_s": t1 - t0, "aggregate_s": t2 - t1, "send_s": t3 - t2, "wait_eval_s": t4 - t3}
        codes = plan.codes.copy()
        codes[[i for i in np.flatnonzero((codes == RETURNS) & ~s.back) if not s.train[i].finite]] = NONFINITE
        records = round_records(r, self.names, s.train, s.evals, s.slot_times, server, codes, self.task.summarize,
                                self.task.metrics)
        summary = records[-1]
        summary.update(retries=plan.retries, sim_time_s=plan.sim_time_s, **agg_info)
        summary.update(central_total(s.central, self.task.summarize, self.task.metrics))
        summary.update(s.record)
        self._end_round(r, records, nxt)
        return nxt, records

    def _end_round(self, r: int, records: List[Dict[str, Any]], nxt: Control) -> None:
        """Round ``r``'s best model, checkpoint (in the background), times and metrics."""
        cfg, summary = self.cfg, records[-1]
        t5 = time.perf_counter()
        self._track_best(r, summary)  # best.npz: counted with the checkpoint
        if r % cfg.checkpoint.every == 0 or r == cfg.fl.rounds or nxt.stop:
            self.checkpoint(r, records)
        self.writes.start()
        now = time.perf_counter()
        summary["time"]["checkpoint_s"] = now - t5
        summary["time"]["round_s"] = now - self._t_prev
        summary["time"]["overhead_s"] = max(0.0, summary["time"]["round_s"] - summary["time"]["train_s"])
        self._t_prev = now
        self.rundir.append_metrics(strict(records))

    def _track_best(self, r: int, summary: Dict[str, Any]) -> None:
        if self.best.better(r, summary):
            m = self.model
            arrays = {f"model/{k}": v for k, v in state_views(m.weights, m.entries).items()}
            meta = {"round": r, "metric": self.best.key, "value": self.best.best["value"], "signature": m.signature}
            self.writes.pending.append(lambda: write_npz_atomic(self.rundir.best, arrays, meta))

    def memory(self) -> Dict[str, float]:
        """Rank 0's memory: FedAvg by Reduce must keep it at a constant number of model copies."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        model = self.model.weights.nbytes
        return {"model_mb": model / 2**20, "rss_before_model_mb": self.rss_before_model / 2**20,
                "peak_rss_mb": peak / 2**20, "model_copies_above_baseline": (peak - self.rss_before_model) / model,
                "strategy_model_copies": self.strategy.memory_copies()}

    def checkpoint(self, round_: int, records: List[Dict[str, Any]]) -> None:
        """Round ``round_``'s checkpoint, assembled from :meth:`parts` and written in the background."""
        arrays, state = assemble(self.parts())
        if self._config_hash is None:  # once: it serialises every site's settings (10,000 sites: 2.6 MB)
            self._config_hash = config_hash(self.cfg)
        # what the round's records and state are now: the caller goes on adding timings to them
        meta = copy.deepcopy({"config_hash": self._config_hash, "signature": self.model.signature,
                              "rng": state["rng"], "records": records, "state": state["state"]})
        model, strategy, keep = arrays["model"], arrays["strategy"], self.cfg.checkpoint.keep
        self.writes.pending.append(lambda: save_checkpoint(self.rundir.checkpoints, round_, model, meta,
                                                           strategy=strategy, keep=keep))
        self.checkpointed_round = round_
        self.last_records = records


def best_metric(cfg: Config, task) -> str:
    """``eval.best_metric`` as a summary key: ``val_<metric of the task>``; ``auto`` = the first headline metric."""
    from ..config import suggest
    from ..errors import ConfigError

    want = cfg.eval.best_metric
    names = [f"val_{m}" for m in task.metrics]
    if want == "auto":
        return f"val_{(task.headline or task.metrics)[0]}"
    if want not in names:
        raise ConfigError(f"eval.best_metric: {want!r} is not a metric of task {cfg.task!r} ({', '.join(names)})"
                          f"{suggest(want, names)}")
    return want


def maybe_fail(cfg: Config, rank: int, round_: int, before: Optional[Callable[[], None]] = None) -> None:
    """debug.inject_failure: make this rank fail at the start of a round, on purpose (after ``before``: rank 0
    finishes writing the checkpoint of the round before, so that tests know where a resume starts)."""
    import os
    import signal

    inj = cfg.debug.inject_failure
    if inj is None or inj.rank != rank or inj.round != round_:
        return
    if before is not None:
        before()
    log.warning("injecting failure (%s) at round %d", inj.mode, round_)
    if inj.mode == "kill":
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    if inj.mode == "stop":
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if inj.mode == "oom":
        _leak(inj.memory_mb)
        raise RankFailure(f"injected allocation of {inj.memory_mb} MiB at round {round_} exceeded no memory limit "
                          "(debug.inject_failure.memory_mb)")
    raise RankFailure(f"injected failure at round {round_} (debug.inject_failure)")


def maybe_hold(cfg: Config, round_: int, before: Callable[[], None], beat: Callable[[str, int], None],
               stop: Callable[[], bool], poll_s: float = 0.05) -> None:
    """debug.hold: wait at the start of a round while a file exists, so that a test sees the run live at a
    known round instead of racing a machine that may finish every round before the test looks. A kill
    during the hold resumes after the round before; a stop asked during it ends the hold, and the run
    stops after this round."""
    hold = cfg.debug.hold
    if hold is None or hold.round != round_:
        return
    before()  # the round before is on disk: a kill during the hold resumes from it
    path = Path(hold.file)
    if path.exists():
        log.warning("holding at the start of round %d while %s exists (debug.hold)", round_, path)
    while path.exists() and not stop():
        beat("held (debug.hold)", round_)
        time.sleep(poll_s)


def _leak(mb: int) -> list:
    """Allocate and touch ``mb`` MiB, 64 at a time (numpy: rank 0 has no torch); returned so it stays allocated."""
    import numpy as np

    held = []
    for _ in range(-(-mb // 64)):
        held.append(np.ones(64 << 17, dtype=np.float64))  # 64 MiB, every page written
    return held


__all__ = ["Aggregator", "request_stop", "maybe_fail", "maybe_hold"]
