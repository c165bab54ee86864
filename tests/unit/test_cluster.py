"""Placement (pure) and sbatch rendering (golden files: slurm/*.sbatch)."""
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, hpcfl
from hpcfl.cluster.placement import Shape, place, ranks_per_node
from hpcfl.cluster.render import placement_text, render_sbatch
from hpcfl.config import from_dict, load_config
from hpcfl.errors import ConfigError


def by_site(places, sites):
    out, k = {}, 1
    for name, r in sites:
        out[name] = places[k:k + r]
        k += r
    return out


def test_one_node_two_cores_workstation():
    sites = [("a", 1), ("b", 1)]
    p = place(Shape(1, 1, 2), sites, aggregator_cores=0, cores_per_rank=1)
    assert p[0].cores == () and [x.cores for x in p[1:]] == [(0,), (1,)]  # site ranks on different cores
    with pytest.raises(ConfigError, match=r"the sites need 4 ranks but 1 node\(s\) give 2"):
        place(Shape(1, 1, 2), [("a", 2), ("b", 2)], aggregator_cores=0, cores_per_rank=1)
    over = place(Shape(1, 1, 2), [("a", 2), ("b", 2)], aggregator_cores=0, cores_per_rank=1, oversubscribe=True)
    assert [x.cores for x in over[1:]] == [(0,), (1,), (0,), (1,)]


def test_two_nodes_two_sockets_sixteen_cores_four_gpus():
    sites = [("a", 2), ("b", 2), ("c", 4)]
    p = place(Shape(2, 2, 16, 4), sites, aggregator_cores=1)
    s = by_site(p, sites)
    assert p[0].node == 0 and p[0].cores == (0,) and p[0].gpu is None
    assert {x.node for x in s["a"]} == {0} and {x.node for x in s["b"]} == {0}
    assert {x.node for x in s["c"]} == {1}  # a 4-rank site that fits on one node stays on one node
    assert [x.gpu for x in p[1:]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all(x.cores and 0 not in x.cores for x in s["a"])  # nobody shares the aggregator's core
    node0 = [c for x in p if x.node == 0 for c in x.cores]
    assert len(node0) == len(set(node0))  # no core given twice
    assert [x.socket for x in s["c"]] == [0, 0, 1, 1]  # GPUs 0-1 on socket 0, 2-3 on socket 1
    assert ranks_per_node(p, 2) == [5, 4]


def test_four_nodes_of_eight_gpus_sites_never_split():
    sites = [(f"s{i}", 3) for i in range(8)]
    p = place(Shape(4, 2, 32, 8), sites)
    for name, ranks in by_site(p, sites).items():
        assert len({x.node for x in ranks}) == 1, name
    assert ranks_per_node(p, 4) == [1 + 6, 6, 6, 6]  # two whole sites per node
    more = [(f"s{i}", 3) for i in range(10)]  # 30 ranks on 32 GPUs: two sites cannot stay whole
    p = place(Shape(4, 2, 32, 8), more)
    assert ranks_per_node(p, 4) == [1 + 8, 8, 8, 6]
    assert [len({x.node for x in r}) for r in by_site(p, more).values()] == [1] * 8 + [2, 2]
    big = [("huge", 12)]  # larger than a node: spans consecutive nodes
    assert [x.node for x in place(Shape(4, 2, 32, 8), big)[1:]] == [0] * 8 + [1] * 4
    with pytest.raises(ConfigError, match=r"need 33 ranks but 4 node\(s\) give 32 \(one rank per GPU\)"):
        place(Shape(4, 2, 32, 8), [("x", 33)])
    own = place(Shape(4, 2, 32, 8), [("x", 8)], aggregator_own_node=True)
    assert own[0].node == 0 and {x.node for x in own[1:]} == {1}


@pytest.mark.parametrize("name", ["single-node-cpu", "single-node-multigpu", "multi-node-multigpu"])
def test_slurm_scripts_are_rendered_from_the_configs(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rse", ROOT / "scripts" / "render_slurm_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    golden = (ROOT / "slurm" / f"{name}.sbatch").read_text()
    assert mod.rendered()[name] == golden, "slurm/ is stale: run scripts/render_slurm_examples.py and review the diff"
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / f"{name}.sbatch")]).returncode == 0


def test_rendered_script_essentials():
    text = (ROOT / "slurm" / "multi-node-multigpu.sbatch").read_text()
    for line in ["#SBATCH --nodes=5", "#SBATCH --ntasks=25", "#SBATCH --ntasks-per-node=6", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --exclusive", "#SBATCH --requeue", "export SLURM_HOSTFILE=",
                 "--distribution=arbitrary", "singularity exec --nv", "hpcfl.sif python3 -m hpcfl run"]:
        assert line in text, line
    cpu = (ROOT / "slurm" / "single-node-cpu.sbatch").read_text()
    assert '--rankfile "$placement"' in cpu and "--report-bindings" in cpu and "module load openmpi/4.1" in cpu


def test_a_request_that_cannot_fit_fails_in_one_line():
    cfg = from_dict({"sites": {"count": 5, "ranks": 2}, "cluster": {"nodes": 1, "gpus_per_node": 8}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^cluster: the sites need 10 ranks but 1 node\(s\) give 8 \(one rank per GPU\)"):
        render_sbatch(cfg, "c.yaml")
    r = hpcfl("render", "configs/cluster-gpu.yaml", "--set", "cluster.nodes=1", "--set", "sites.count=5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "need 10 ranks" in r.stderr


def test_placement_files():
    cfg = load_config(ROOT / "configs" / "cluster-gpu.yaml")
    hosts = placement_text(cfg, ["gn01"], "hostfile").splitlines()
    assert hosts == ["gn01"] * 9
    rankfile = placement_text(cfg, ["gn01"], "rankfile").splitlines()
    assert rankfile[0] == "rank 0=gn01 slot=0:0-0" and rankfile[1] == "rank 1=gn01 slot=0:1-4"
    assert rankfile[5] == "rank 5=gn01 slot=1:0-3"  # GPU 4: socket 1, socket-local cores
    assert placement_text(cfg, ["gn01"], "hosts") == "gn01:9\n"


def test_render_cli_writes_a_file(tmp_path):
    out = tmp_path / "job.sbatch"
    r = hpcfl("render", "configs/cluster-cpu.yaml", "--launcher", "srun", "-o", out)
    assert r.returncode == 0 and "sbatch" in r.stdout
    assert "srun --mpi=pmix --ntasks=3" in out.read_text()


GOLDEN = {2: "{count: 4, ranks: 4}", 4: "{count: 8, ranks: 4}"}


@pytest.mark.parametrize("nodes", [2, 4])
def test_multi_node_gpu_scripts_match_golden_files(nodes):
    """Reviewed line by line: whole nodes, 8 GPUs each, ranks placed by hostfile, pinned by the ranks."""
    ov = [f"cluster.nodes={nodes}", f"sites={GOLDEN[nodes]}", "cluster.aggregator_own_node=false", "cluster.container="]
    cfg = load_config(ROOT / "configs" / "cluster-multinode.yaml", ov)
    text = render_sbatch(cfg, "configs/cluster-multinode.yaml", ov)
    assert text == (ROOT / "tests" / "golden" / f"gpu-{nodes}node.sbatch").read_text()
    hosts = placement_text(cfg, [f"gn{i}" for i in range(nodes)], "hostfile").split()
    # every 4-rank site on one node; node 0 also hosts the aggregator
    assert hosts[0] == "gn0" and all(len(set(hosts[1 + 4 * s:5 + 4 * s])) == 1 for s in range(nodes * 2))
