"""A new aggregation kind, a new start-up exchange and new per-round exchanges plug into the round protocol
without an edit to hpcfl/: each is one class, defined here (in the program every rank runs), the kind
registered with ``hpcfl.protocol.kinds.register`` and named by a strategy's ``kind``, the start-up exchange
added to ``hpcfl.protocol.startup.STARTUP``, the per-round ones to ``hpcfl.protocol.rounds.ROUND`` (one at the
point before training, rank 0 to every slot rank; one after evaluation, the slot leaders back to rank 0, into
the round's record). Both sides of the federation then run them, every round.

The test-only kind sends each slot's sum of weighted updates pickled, through a gather, and rank 0 adds
them up: with one site per slot that is the same float arithmetic as FedAvg's Reduce, so the run must end
with the golden FedAvg weights (bits on the machine that made them, the tolerance elsewhere).
"""
import json
import os
import sys
import subprocess

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from weights_fingerprint import compare, environment, last_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("need_mpirun")

PLUGGED = r'''
import json, os, sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import hpcfl.aggregation as aggregation
from hpcfl.aggregation.strategies import FedAvg
from hpcfl.protocol import rounds, startup
from hpcfl.protocol.kinds import Kind, mean_of_sum, register
from hpcfl.protocol.message import Message


@register("test_gathered_sum")
class GatheredSum(Kind):
    """Each slot leader sends the sum of its sites' weighted updates pickled; rank 0 adds them in slot order."""

    def __init__(self, *args):
        super().__init__(*args)
        self.acc = np.zeros(self.size, np.float32)
        self.empty = True

    def begin_round(self, ctl, r):
        self.acc.fill(0.0)
        self.empty = True

    def add_site(self, site, update, weight):
        x = np.multiply(update, np.float32(weight))
        if self.empty:
            self.acc[...] = x
        else:
            self.acc += x
        self.empty = False

    def upload(self, fed, back, mine):
        fed.gather(self.acc, root=0)

    def aggregate(self, fed, strategy, back, num_train, acc, rows):
        sums = fed.gather(None, root=0)[1:]
        acc.fill(0.0)
        for s in sums:
            acc += s
        info = mean_of_sum(strategy, acc, back, back, num_train, rows)
        return {"plugin_kind": self.name, "plugin_slots": len(sums), **info}


class GatheredFedAvg(FedAvg):
    kind = "test_gathered_sum"


class PidsExchange(startup.StartupExchange):
    """Each slot leader says which process it is; rank 0 writes them into the run directory."""

    @staticmethod
    def server(s):
        Path(s.where, "plugin-pids.json").write_text(json.dumps(s.fed.gather(None, root=0)[1:]))

    @staticmethod
    def slot(s):
        s.fed.gather({"slot": s.slot, "pid": os.getpid()}, root=0)


@dataclass
class Tag(Message):
    tag: int = 0


class TagOut(rounds.RoundExchange):
    """Before training: rank 0 sends every slot rank the round's tag (1000 + r), packed."""

    at = rounds.BEFORE_TRAINING
    every_slot_rank = True

    @staticmethod
    def server(s):
        Tag.bcast((s.fed,), s.k, Tag(1000 + s.r))

    @staticmethod
    def slot(s):
        s.extra["tag"] = Tag.bcast((s.fed, s.slot_comm), s.k).tag


@dataclass
class Echo(Message):
    slot: int
    round: int
    tag: int
    trained: int
    evaluated: int


class TagBack(rounds.RoundExchange):
    """After evaluation: each slot leader returns the tag with what its slot trained and evaluated."""

    at = rounds.AFTER_EVALUATION

    @staticmethod
    def server(s):
        s.record["plugin_tags"] = [asdict(m) for m in s.fed.gather(None, root=0)[1:]]

    @staticmethod
    def slot(s):
        s.fed.gather(Echo(s.slot, s.r, s.extra["tag"], sum(row.trained for row in s.rows), len(s.evals)), root=0)


def strategy_for(fl):
    return GatheredFedAvg()


aggregation.strategy_for = strategy_for  # what hpcfl.privacy.server.run_strategy builds, on every rank
startup.STARTUP.append(PidsExchange)
rounds.ROUND.extend([TagOut, TagBack])

from hpcfl.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''


def test_a_kind_and_exchanges_defined_outside_hpcfl_run_on_both_sides(tmp_path):
    from hpcfl.config import load_config
    from hpcfl.launch import mpirun_argv, rank_argv

    golden = json.loads((ROOT / "tests" / "golden" / "final-weights.json").read_text())
    case = golden["runs"][0]
    assert case["config"] == "configs/digits.yaml" and case["set"] == ["fl.rounds=4"]
    plugged = tmp_path / "plugged.py"
    plugged.write_text(PLUGGED)
    sets = [*case["set"], f"run.root={tmp_path}", "run.name=plugged"]
    cfg = load_config(case["config"], sets)
    cores = len(os.sched_getaffinity(0))
    rank = rank_argv(case["config"], sets, pin="local" if 3 > cores else "none")
    assert rank[1:3] == ["-m", "hpcfl"]
    argv = mpirun_argv(cfg, [sys.executable, str(plugged), *rank[3:]], cores=cores, as_root=os.geteuid() == 0, n=3)
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "plugged"
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in rounds if x["kind"] == "round"]
    assert [(x["plugin_kind"], x["plugin_slots"]) for x in rounds] == [("test_gathered_sum", 2)] * 4
    assert [x["plugin_tags"] for x in rounds] == [
        [{"slot": slot, "round": r, "tag": 1000 + r, "trained": 1, "evaluated": 1} for slot in (0, 1)]
        for r in range(1, 5)]
    assert (run / "cross_site.json").exists()  # the built-in end-of-run exchange still ran
    pids = json.loads((run / "plugin-pids.json").read_text())
    assert [p["slot"] for p in pids] == [0, 1] and len({p["pid"] for p in pids}) == 2
    import numpy as np

    with np.load(ROOT / "tests" / "golden" / case["weights"]) as z:
        ref = {k: z[k] for k in z.files}
    ok, why = compare(case, last_model(run), environment(), ref, golden["tolerance"]["relative_l2"])
    assert ok, why
