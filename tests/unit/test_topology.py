import numpy as np
import pytest

from hpcfl.errors import TopologyError
from hpcfl.topology import (UNDEFINED, assign_slots, auto_slots, build_topology, comm_colors, slots_for_world,
                            world_size_for)

SITES = [("a", 2), ("b", 2)]


def test_rank_zero_is_aggregator_and_sites_are_contiguous():
    t = build_topology(5, SITES)
    roles = [t.role(r) for r in range(5)]
    assert roles[0].is_aggregator and roles[0].slot is None
    assert [(r.names, r.rank_in_slot, r.is_leader) for r in roles[1:]] == [
        (("a",), 0, True), (("a",), 1, False), (("b",), 0, True), (("b",), 1, False)]
    assert t.leaders == (1, 3)
    assert t.site_ranks == (1, 2, 3, 4)


def test_uneven_sites_and_single_rank_sites():
    t = build_topology(7, [("x", 1), ("y", 3), ("z", 2)])
    assert [s.ranks for s in t.slots] == [(1,), (2, 3, 4), (5, 6)]
    assert [s.sites for s in t.slots] == [(0,), (1,), (2,)]
    assert t.role(4).names == ("y",) and t.role(4).rank_in_slot == 2
    assert t.role(5).is_leader
    # virtual ranks are the world ranks of one slot per site
    assert [s.first_rank for s in t.sites] == [1, 2, 5]


def test_world_size_mismatch_says_what_was_expected():
    with pytest.raises(TopologyError) as e:
        build_topology(4, SITES, slots=2)
    msg = str(e.value)
    assert "4 ranks" in msg and "5 ranks = 1 aggregator + site 'a' (2), site 'b' (2)" in msg
    assert "\n" not in msg


def test_world_size_that_no_slot_count_gives_lists_the_valid_ones():
    with pytest.raises(TopologyError) as e:
        build_topology(4, SITES)
    assert "3, 5 ranks" in str(e.value) and "\n" not in str(e.value)


def test_rank_out_of_range():
    with pytest.raises(TopologyError):
        build_topology(5, SITES).role(5)


def test_process_sets_exclude_the_aggregator():
    # site backends run on the communicator of all slot ranks: world rank r is rank r-1 there.
    assert build_topology(5, SITES).process_sets() == ((0, 1), (2, 3))


def test_communicator_colours():
    t = build_topology(5, SITES)
    c = [comm_colors(t.role(r)) for r in range(5)]
    assert [x["federation"] for x in c] == [0, 0, UNDEFINED, 0, UNDEFINED]
    assert [x["site"] for x in c] == [UNDEFINED, 0, 0, 1, 1]
    assert [x["trainers"] for x in c] == [UNDEFINED, 0, 0, 0, 0]


def test_describe_names_rank_and_site():
    t = build_topology(5, SITES)
    assert t.role(4).describe() == "rank 4 (site 'b', rank 1 of 2 in site)"
    assert t.role(0).describe() == "rank 0 (aggregator)"
    one = build_topology(3, [("a", 2), ("b", 2)], slots=1)
    assert one.role(2).describe() == "rank 2 (slot 0: sites 'a', 'b', rank 1 of 2 in slot)"


# -- slots ------------------------------------------------------------------------------------------

def test_one_slot_simulates_every_site_of_its_rank_count():
    t = build_topology(3, [("a", 2), ("b", 2), ("c", 2)], slots=1)
    assert len(t.slots) == 1 and t.slots[0].ranks == (1, 2) and t.slots[0].sites == (0, 1, 2)
    assert [s.slot for s in t.sites] == [0, 0, 0]
    # seeds stay those of one slot per site
    assert [s.virtual_rank(1) for s in t.sites] == [2, 4, 6]


def test_sites_are_cut_into_contiguous_near_equal_runs():
    assert assign_slots([1] * 7, 3) == [(0, 1, 2), (3, 4), (5, 6)]
    assert assign_slots([1] * 4, 4) == [(0,), (1,), (2,), (3,)]


def test_sites_of_different_rank_counts_never_share_a_slot():
    # 4 sites of 1 rank, 2 of 2 ranks; 3 slots: one for the 2-rank sites at least,
    # the spare slot goes to the rank count with more sites.
    sizes = [1, 2, 1, 1, 2, 1]
    plan = assign_slots(sizes, 3)
    assert plan == [(0, 2), (1, 4), (3, 5)]
    for p in plan:
        assert len({sizes[i] for i in p}) == 1
    assert world_size_for(sizes, 3) == 1 + 1 + 2 + 1


def test_too_few_or_too_many_slots_is_a_one_line_error():
    with pytest.raises(TopologyError, match="choose between 2 and 3"):
        assign_slots([1, 2, 1], 1)
    with pytest.raises(TopologyError, match="choose between 1 and 2"):
        assign_slots([1, 1], 3)


def test_auto_slots_one_per_site_when_cores_suffice_else_as_many_as_fit():
    assert auto_slots([1] * 8, capacity=16) == 8
    assert auto_slots([1] * 128, capacity=2) == 2
    assert auto_slots([2, 2], capacity=2) == 1  # two 2-rank sites on 2 cores: one slot of 2 ranks
    assert auto_slots([2, 2, 1], capacity=1) == 2  # at least one slot per rank count


def test_slots_follow_from_the_world_size():
    sizes = [1] * 64
    assert slots_for_world(sizes, 3) == 2
    assert slots_for_world(sizes, 65) == 64
    t = build_topology(3, [(f"s{i}", 1) for i in range(64)])
    assert [len(s.sites) for s in t.slots] == [32, 32]


def test_balanced_assignment_is_longest_first_and_deterministic():
    from hpcfl.topology import balance

    # LPT: 7 -> slot 0, 5 -> slot 1, 4 -> slot 1 (5 < 7), 3 -> slot 0 (7 < 9), 1 -> slot 1 (9 < 10)
    assert balance([3, 7, 1, 5, 4], 2) == [0, 0, 1, 1, 1]
    work = np.random.default_rng(0).integers(1, 100, 50)
    slots = balance(work, 3)
    assert slots == balance(work, 3)  # every rank computes the same
    load = np.bincount(slots, weights=work, minlength=3)
    assert load.max() - load.min() <= work.max()  # greedy: no slot over the others by more than one site
    contiguous = [np.sum(p) for p in np.array_split(work, 3)]
    assert load.max() <= max(contiguous)
    assert balance([2.0, 2.0, 2.0, 2.0], 2) == [0, 1, 0, 1]  # ties: lower index first, lower slot first
    with pytest.raises(TopologyError):
        balance([1.0], 0)
