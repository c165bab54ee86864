"""One object per aggregation kind (hpcfl.protocol.kinds), chosen once from the strategy's ``kind``."""
import numpy as np
import pytest

from hpcfl.aggregation import strategy_for
from hpcfl.aggregation.strategies import FedAvg
from hpcfl.config import load_config
from hpcfl.protocol.gathered import CoordinateKind, SelectKind
from hpcfl.protocol.kinds import KINDS, Kind, make_kind, register
from hpcfl.protocol.mean import MeanKind, SecureMeanKind
from hpcfl.topology import topology_for

pytestmark = pytest.mark.unit


def kind_of(*sets):
    cfg = load_config("configs/digits.yaml", ["sites={count: 5, ranks: 1}", *sets])
    return make_kind(cfg, strategy_for(cfg.fl), 10, topology_for(cfg))


def test_each_strategy_gets_its_kind_once():
    assert type(kind_of()) is MeanKind
    assert type(kind_of("fl.strategy=fedadam")) is MeanKind
    secure = kind_of("privacy.secure_aggregation=true")
    assert type(secure) is SecureMeanKind and secure.bits == 24
    assert type(kind_of("fl.strategy=median")) is CoordinateKind
    krum = kind_of("fl.strategy=krum")
    assert type(krum) is SelectKind and len(krum.names) == 5


def test_a_kind_registered_outside_hpcfl_is_chosen_by_the_strategy_that_names_it():
    @register("test_halves")
    class Halves(Kind):
        def add_site(self, site, update, weight):
            pass

    class HalfAvg(FedAvg):
        kind = "test_halves"

    try:
        cfg = load_config("configs/digits.yaml", [])
        kind = make_kind(cfg, HalfAvg(), 7, topology_for(cfg))
        assert isinstance(kind, Halves) and kind.size == 7 and kind.k == 2 and kind.name == "test_halves"
    finally:
        KINDS.pop("test_halves")


def test_a_strategy_of_an_unknown_kind_is_refused_in_one_line():
    class Odd(FedAvg):
        kind = "nowhere"

    cfg = load_config("configs/digits.yaml", [])
    with pytest.raises(ValueError, match=r"strategy 'fedavg' is of kind 'nowhere', which no aggregation kind "
                                         r"implements \(coordinate, mean, select\)"):
        make_kind(cfg, Odd(), 3, topology_for(cfg))


def test_the_mean_kind_sums_a_slots_sites_and_rank_0_divides_by_the_total_weight():
    kind = MeanKind(3, 8, 2, [[0, 1]], ["a", "b"])
    kind.begin_round(None, 1)
    kind.add_site(0, np.array([1.0, 2.0, 3.0], np.float32), 2.0)
    kind.add_site(1, np.array([3.0, 0.0, 1.0], np.float32), 1.0)
    assert list(kind.acc) == [5.0, 4.0, 7.0]


def test_a_privacy_wrapper_sees_the_sum_before_it_becomes_a_mean():
    from hpcfl.protocol.kinds import mean_of_sum

    class Noisy(FedAvg):
        def on_sum(self, acc, back, rows):
            acc += 1.0  # what DP's noise does, deterministically
            return {"seen_sites": int(back.sum())}

    acc = np.array([4.0, 8.0], np.float32)
    back = np.array([True, False, True])
    info = mean_of_sum(Noisy(), acc, back, back, np.array([1.0, 5.0, 4.0]), {})
    assert info == {"seen_sites": 2} and list(acc) == pytest.approx([1.0, 1.8])
