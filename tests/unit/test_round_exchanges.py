"""The per-round exchanges (hpcfl.protocol.rounds): one class each, run by both loops at the point it names."""
import numpy as np
import pytest

from hpcfl.config import load_config
from hpcfl.privacy.server import DifferentialPrivacy, run_strategy
from hpcfl.protocol.control import Control
from hpcfl.protocol.rounds import (AFTER_EVALUATION, BEFORE_TRAINING, END_OF_RUN, POINTS, ROUND, RoundExchange,
                                   ServerRound, SlotRound, run_server, run_slot)

pytestmark = pytest.mark.unit


def contexts(cfg, leader=True):
    ctl = Control.make(None, 2, 0.0, stop=False)
    server = ServerRound(None, cfg, 3, ctl, ["a", "b"], None, None, None)
    slot = SlotRound(object() if leader else None, None, cfg, 3, ctl, 1, 2, None, None, None)
    return server, slot


def test_the_built_in_exchanges_and_their_points():
    assert [(x.__name__, x.at) for x in ROUND] == [
        ("TrainReports", "after training"), ("GlobalModel", "after aggregation"),
        ("EvalReports", "after evaluation"), ("CrossSiteExchange", "end of run")]
    assert all(x.at in POINTS for x in ROUND)


def test_an_appended_exchange_runs_at_its_point_on_both_sides_in_order():
    seen = []

    class First(RoundExchange):
        at = AFTER_EVALUATION

        @staticmethod
        def server(s):
            seen.append(("first", "server", s.r))
            s.record["tag"] = s.r * 10

        @staticmethod
        def slot(s):
            seen.append(("first", "slot", s.slot))

    class Everyone(RoundExchange):
        at = AFTER_EVALUATION
        every_slot_rank = True
        phase = "tagging"

        @staticmethod
        def wanted(cfg):
            return cfg.fl.rounds > 1

        @staticmethod
        def server(s):
            seen.append(("everyone", "server", s.r))

        @staticmethod
        def slot(s):
            seen.append(("everyone", "slot", s.fed is None))

    cfg = load_config("configs/digits.yaml", ["eval.cross_site=false"])
    beats = []
    built_in = list(ROUND)
    ROUND.extend([First, Everyone])
    try:
        server, slot = contexts(cfg)
        server.beat = lambda what, r: beats.append((what, r))
        for point in (BEFORE_TRAINING, END_OF_RUN):  # other points: not theirs (and no built-in is due there)
            run_server(point, server)
            run_slot(point, slot)
        assert seen == []
        ROUND.remove(built_in[2])  # EvalReports needs communicators: leave just the two at AFTER_EVALUATION
        run_server(AFTER_EVALUATION, server)
        run_slot(AFTER_EVALUATION, slot)
        run_slot(AFTER_EVALUATION, contexts(cfg, leader=False)[1])  # a slot rank that is not its slot's leader
        assert server.record == {"tag": 30} and beats == [("tagging", 3)]
        assert seen == [("first", "server", 3), ("everyone", "server", 3), ("first", "slot", 1),
                        ("everyone", "slot", False), ("everyone", "slot", True)]
        del seen[:]
        run_server(AFTER_EVALUATION, contexts(load_config("configs/digits.yaml", ["fl.rounds=1"]))[0])
        assert seen == [("first", "server", 3)]  # Everyone is not wanted by this config
    finally:
        ROUND[:] = built_in


def test_an_exchange_at_no_known_point_is_refused():
    class Nowhere(RoundExchange):
        at = "sometime"

    cfg = load_config("configs/digits.yaml", [])
    ROUND.append(Nowhere)
    try:
        with pytest.raises(ValueError, match="Nowhere.*before training"):
            run_server(BEFORE_TRAINING, contexts(cfg)[0])
    finally:
        ROUND.remove(Nowhere)


def test_rank_0_and_the_sites_get_their_strategy_from_one_place():
    cfg = load_config("configs/digits.yaml", ["privacy.dp={clip_norm: 1.0, noise_multiplier: 0.5}",
                                              "fl.sampling.fraction=0.5"])
    rank0 = run_strategy(cfg, 4, np.random.default_rng(0))
    site = run_strategy(cfg, 4)
    assert isinstance(rank0, DifferentialPrivacy) and isinstance(site, DifferentialPrivacy)
    assert rank0.accountant is not None and site.accountant is None and site.rng is None
    assert site.upload_weight(100) == rank0.upload_weight(100) == 1.0 and site.upload_clip() == rank0.upload_clip()
    plain = load_config("configs/digits.yaml", [])
    assert type(run_strategy(plain, 2)) is type(run_strategy(plain, 2, np.random.default_rng(0))) is not DifferentialPrivacy
