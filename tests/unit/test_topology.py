import pytest

from hpcfl.errors import TopologyError
from hpcfl.topology import UNDEFINED, build_topology, comm_colors

SITES = [("a", 2), ("b", 2)]


def test_rank_zero_is_aggregator_and_sites_are_contiguous():
    t = build_topology(5, SITES)
    roles = [t.role(r) for r in range(5)]
    assert roles[0].is_aggregator and roles[0].site is None
    assert [(r.site.name, r.rank_in_site, r.is_leader) for r in roles[1:]] == [
        ("a", 0, True), ("a", 1, False), ("b", 0, True), ("b", 1, False)]
    assert t.leaders == (1, 3)
    assert t.site_ranks == (1, 2, 3, 4)


def test_uneven_sites_and_single_rank_sites():
    t = build_topology(7, [("x", 1), ("y", 3), ("z", 2)])
    assert [s.ranks for s in t.sites] == [(1,), (2, 3, 4), (5, 6)]
    assert t.role(4).site.name == "y" and t.role(4).rank_in_site == 2
    assert t.role(5).is_leader


def test_world_size_mismatch_says_what_was_expected():
    with pytest.raises(TopologyError) as e:
        build_topology(4, SITES)
    msg = str(e.value)
    assert "4 ranks" in msg and "5 ranks = 1 aggregator + site 'a' (2), site 'b' (2)" in msg
    assert "\n" not in msg


def test_rank_out_of_range():
    with pytest.raises(TopologyError):
        build_topology(5, SITES).role(5)


def test_horovod_process_sets_exclude_the_aggregator():
    # Horovod runs on the communicator of all site ranks: world rank r is Horovod rank r-1.
    assert build_topology(5, SITES).horovod_process_sets() == ((0, 1), (2, 3))


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
