"""`sites: {count: N}` stays a count on rank 0: what rank 0 builds for 10,000 sites and a cohort of 50 holds no
per-site objects, and every site it is asked for is the one the expanded list gives (issue 22)."""
import gc
import json
import tracemalloc

import numpy as np
import pytest

from hpcfl.config import SiteConfig, config_hash, dump_yaml, from_dict, parse_yaml, to_dict
from hpcfl.participation import eval_sites, plan_round
from hpcfl.protocol.records import SiteInfo
from hpcfl.sitelist import SiteNames, UniformSites
from hpcfl.topology import LISTED_MAX, Site, build_topology, build_uniform, listed, topology_for

TEXT = """
sites: {{count: {k}, ranks: 1}}
fl: {{rounds: 3, sampling: {{fraction: {f}}}}}
data: {{name: synthetic, samples: {n}, features: 8, classes: 3}}
launch: {{assign: balanced}}
"""


def slot_tables(k: int):
    """SiteInfo.table of each of 2 slots, as the slots send them (slot-side memory: made before counting)."""
    return [np.arange(a, b, dtype=np.int64)[:, None] * [1, 0, 0] + [0, 50, 5] for a, b in ((0, k // 2), (k // 2, k))]


def rank_zero(k: int, tables=None, rounds: int = 5):
    """What rank 0 does with the sites from loading the config to the rounds' plans (runtime._prepare,
    _start_rank and _aggregate, protocol.server's start-up and send_plan), without MPI."""
    raw = parse_yaml(TEXT.format(k=k, f=50 / k, n=63 * k), "t.yaml")
    cfg = from_dict(raw, "t.yaml")
    cfg = from_dict(to_dict(cfg), "t.yaml (as resolved by rank 0)")  # the broadcast config
    text, digest = dump_yaml(cfg), config_hash(cfg)
    topo = topology_for(cfg, world_size=3)
    names = topo.names
    manifest = json.dumps({"slots": [{"ranks": list(s.ranks), "sites": listed(names, s.sites)} for s in topo.slots],
                           "ranks": [listed(topo.role(r).names) for r in range(1, 3)]})
    info = SiteInfo.columns(slot_tables(k) if tables is None else tables, k)
    del tables
    steps = info[:, 2].copy()
    rng = np.random.default_rng(0)
    cohort = [[names[i] for i in np.flatnonzero(plan_round(rng, cfg.fl, cfg.sites, steps, r).returns)]
              for r in range(1, rounds + 1)]  # the plan is dropped after its round
    evaluated = [[names[i] for i in eval_sites(cfg.eval, 0, k, r, rounds)] for r in range(1, rounds + 1)]
    return cfg, topo, (text, digest, manifest, steps, cohort, evaluated)


def per_site_objects() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, (SiteConfig, Site)))


def test_rank_zero_holds_no_per_site_objects_for_10000_sites_and_a_cohort_of_50():
    before = per_site_objects()
    kept = rank_zero(10_000)
    assert per_site_objects() - before <= 100  # a few made on demand (the cohort's), not 10,000
    cfg, topo, (text, _, manifest, _, cohort, _) = kept
    assert isinstance(cfg.sites, UniformSites) and len(topo.sites) == 10_000
    assert "count: 10000" in text and "site17" not in text and len(manifest) < 1000
    assert all(len(c) == 50 for c in cohort)


def test_rank_zero_memory_does_not_grow_with_the_sites_that_exist():
    """Counted by tracemalloc (bytes allocated, not time): 1,000 against 10,000 sites, the same cohort of 50.
    The old code's config, topology and manifest held several MB more at 10,000 sites; what is left are
    arrays of a few numbers per site (the sites' sizes and steps, each round's plan codes and draws)."""
    def peak_and_kept(k):
        tables = slot_tables(k)
        gc.collect()
        tracemalloc.start()
        try:
            kept = rank_zero(k, tables)
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del kept
        return current, peak

    peak_and_kept(100)  # imports and caches
    small, large = peak_and_kept(1_000), peak_and_kept(10_000)
    per_site = [(b - a) / 9_000 for a, b in zip(small, large)]
    print(f"bytes per site that exists: kept {per_site[0]:.0f}, peak {per_site[1]:.0f}")
    assert per_site[0] < 48, f"rank 0 keeps {per_site[0]:.0f} bytes per site that exists"
    assert per_site[1] < 160, f"rank 0's peak grows by {per_site[1]:.0f} bytes per site that exists"


def test_lazy_sites_are_the_expanded_list():
    lazy = from_dict(parse_yaml(TEXT.format(k=300, f=0.1, n=63 * 300), "t"), "t")
    raw = parse_yaml(TEXT.format(k=300, f=0.1, n=63 * 300), "t")
    raw["sites"] = [{"name": f"site{i + 1}", "ranks": 1} for i in range(300)]
    listed_ = from_dict(raw, "t")
    assert isinstance(lazy.sites, UniformSites) and isinstance(listed_.sites, tuple)
    assert lazy.sites == listed_.sites and listed_.sites == lazy.sites and lazy == listed_
    assert tuple(lazy.sites) == listed_.sites and lazy.sites[-1] == listed_.sites[-1]
    assert lazy.sites[5:8] == listed_.sites[5:8] and lazy.sites.index(listed_.sites[42]) == 42
    assert config_hash(lazy) == config_hash(listed_)  # a run started before keeps resuming
    assert dump_yaml(lazy) == dump_yaml(listed_) and lazy.world_size == listed_.world_size == 301
    names = SiteNames(300)
    assert list(names) == [s.name for s in listed_.sites] and names.index("site300") == 299
    assert "site301" not in names and "site0" not in names and "x" not in names
    with pytest.raises(IndexError):
        lazy.sites[300]


@pytest.mark.parametrize("k", [1, 2, 7, 64, 101])
@pytest.mark.parametrize("ranks", [1, 2])
def test_lazy_topology_is_the_built_one(k, ranks):
    for n in range(1, min(k, 9) + 1):
        ws = 1 + n * ranks
        lazy = build_uniform(ws, SiteNames(k), ranks, None)
        built = build_topology(ws, [(f"site{i + 1}", ranks) for i in range(k)], None)
        assert tuple(lazy.sites) == built.sites and lazy.names == built.names
        assert [(s.index, s.ranks, tuple(s.sites)) for s in lazy.slots] == [
            (s.index, s.ranks, tuple(s.sites)) for s in built.slots]
        assert [lazy.role(r).names for r in range(ws)] == [built.role(r).names for r in range(ws)]
        assert lazy.sites[lazy.names.index(f"site{k}")] == built.sites[list(built.names).index(f"site{k}")]


def test_listed_names_a_long_slot_by_its_ends():
    assert listed(SiteNames(3)) == ["site1", "site2", "site3"]
    assert listed(SiteNames(10_000), range(5_000, 10_000)) == {"count": 5000, "first": "site5001", "last": "site10000"}
    assert len(listed(SiteNames(LISTED_MAX))) == LISTED_MAX


def test_site_info_columns_name_a_missing_site():
    with pytest.raises(RuntimeError, match=r"no report for sites \[2\]"):
        SiteInfo.columns([SiteInfo.table([SiteInfo(0, 5, 1), SiteInfo(1, 5, 1)]), None], 3)
