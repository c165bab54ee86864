"""Rank 0's state by protocol (hpcfl.protocol.state): a checkpoint is assembled from parts that declare their
state, restored into them, and nothing keeps the loaded checkpoint's arrays alive after the restore."""
import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from hpcfl.config import load_config
from hpcfl.errors import CheckpointError
from hpcfl.model import Entry
from hpcfl.protocol.server import Aggregator
from hpcfl.protocol.startup import InitExchange, ServerStart
from hpcfl.protocol.state import GlobalModel, assemble, restore
from hpcfl.topology import topology_for

pytestmark = pytest.mark.unit
ENTRIES = [Entry("w", (2, 3), 0, 6), Entry("b", (3,), 6, 3)]


class NoComm:
    """Rank 0's federation communicator where nothing else takes part: the flag goes nowhere."""

    def Get_size(self):
        return 2

    def Bcast(self, buf, root=0):
        pass


def aggregator(tmp_path, ckpt, *sets):
    cfg = load_config("configs/digits.yaml", ["fl.rounds=3", f"run.root={tmp_path}", *sets])
    return Aggregator(cfg, topology_for(cfg), None, SimpleNamespace(path=tmp_path), ckpt)


def loaded(model, strategy=None, state=None, rng=None):
    """What hpcfl.checkpoint.load_checkpoint returns."""
    return {"round": 2, "model": model, "strategy": strategy or {}, "state": state or {"best": None},
            "rng": rng or np.random.default_rng(5).bit_generator.state, "records": [{"kind": "round"}]}


def test_nothing_keeps_the_checkpoint_alive_after_the_restore(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full(3, 7.0, np.float32)
    m = np.full(9, 0.5, np.float32)
    ckpt = loaded({"w": w, "b": b}, {"step": np.array(1), "momentum": m})
    refs = [weakref.ref(a) for a in (w, b, m)]
    agg = aggregator(tmp_path, ckpt, "fl.strategy=fedavgm")
    del w, b, m
    assert ckpt == {}  # restored: the caller's reference holds nothing
    start = ServerStart(NoComm(), agg.cfg, agg.k, agg._restore, str(tmp_path), entries=list(ENTRIES))
    agg._restore = None
    InitExchange.server(start)  # the model, restored once the slots said how it is laid out
    assert start.restore is None
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert list(start.weights) == [0, 1, 2, 3, 4, 5, 7, 7, 7]
    assert agg.strategy.state_dict()["momentum"][0] == 0.5 and agg.start_round == 3


def test_a_checkpoint_is_assembled_from_its_parts_and_restored_into_them(tmp_path):
    dp = "privacy.dp={noise_multiplier: 0.5, clip_norm: 1.0, adaptive: true}"
    agg = aggregator(tmp_path, None, dp)
    agg.model = GlobalModel(list(ENTRIES), np.arange(9, dtype=np.float32))
    agg.strategy.clip = 0.25  # adaptive clipping moved it
    agg.strategy.accountant.step(3)
    agg.best.best = {"metric": "val_accuracy", "value": 0.9, "round": 2}
    agg.rng.gen.random(4)
    agg.rng.mark()
    arrays, meta = assemble(agg.parts())
    assert sorted(arrays) == ["model", "strategy"] and list(arrays["model"]) == ["w", "b"]
    assert meta["state"]["best"]["value"] == 0.9 and meta["state"]["clip_norm"] == 0.25
    assert meta["state"]["accountant"]["steps"] == 3 and meta["rng"] == agg.rng.saved
    ckpt = {"round": 2, "model": dict(arrays["model"]), "strategy": arrays["strategy"], "state": meta["state"],
            "rng": meta["rng"]}
    again = aggregator(tmp_path, ckpt, dp)
    assert again.strategy.clip == 0.25 and again.strategy.accountant.steps == 3
    assert again.best.best == {"metric": "val_accuracy", "value": 0.9, "round": 2}
    assert again.rng.gen.random() == agg.rng.gen.random()


def test_a_part_that_refuses_its_state_is_one_line_naming_the_run(tmp_path):
    bad = loaded({"w": np.zeros((2, 3), np.float32)}, {"step": np.array(1), "velocity": np.zeros(9, np.float32)})
    with pytest.raises(CheckpointError, match=r"the checkpoint's fedavgm strategy state: bad fedavgm state"):
        aggregator(tmp_path, bad, "fl.strategy=fedavgm")


def test_restore_reads_each_part_from_its_place():
    seen = {}

    class Part:
        def __init__(self, name):
            self.name = name

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            seen[self.name] = dict(state)

    ckpt = {"strategy": {"m": 1}, "state": {"best": 2, "clip_norm": 3}, "rng": {"x": 4}, "round": 1}
    restore({"strategy": Part("strategy"), "best": Part("best"), "rng": Part("rng")}, ckpt, lambda *a: None)
    assert seen["strategy"] == {"m": 1} and seen["best"] == {"best": 2, "clip_norm": 3} and seen["rng"]["rng"] == {"x": 4}
