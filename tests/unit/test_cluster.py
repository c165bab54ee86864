"""Placement (pure) and sbatch rendering (golden files: slurm/*.sbatch)."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, hpcfl
from hpcfl.cluster.placement import Shape, place, ranks_per_node
from hpcfl.cluster.render import cluster_slots, placement_text, render_sbatch
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


def test_ranks_share_a_gpu_and_split_its_cores():
    # one node, 1 socket of 9 cores (core 0 for the aggregator), 2 GPUs, 2 ranks per GPU:
    # GPU 0 gets cores 1-4, GPU 1 cores 5-8; each of its two ranks half of them
    sites = [("a", 2), ("b", 2)]
    p = place(Shape(1, 1, 9, 2), sites, aggregator_cores=1, ranks_per_gpu=2)
    assert [(x.gpu, x.cores) for x in p[1:]] == [(0, (1, 2)), (0, (3, 4)), (1, (5, 6)), (1, (7, 8))]
    # a 2-site x 2-rank federation on ONE GPU
    one = place(Shape(1, 1, 9, 1), sites, aggregator_cores=1, ranks_per_gpu=4)
    assert [x.gpu for x in one[1:]] == [0] * 4 and [x.cores for x in one[1:]] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    with pytest.raises(ConfigError, match=r"need 4 ranks but 1 node\(s\) give 2 \(one rank per 1/2 GPU\)"):
        place(Shape(1, 1, 9, 1), sites, aggregator_cores=1, ranks_per_gpu=2)
    with pytest.raises(ConfigError, match=r"has 2 core\(s\) left for GPU 0, whose cluster.ranks_per_gpu 4 ranks need one each"):
        place(Shape(1, 1, 3, 1), sites, aggregator_cores=1, ranks_per_gpu=4)
    # from a config: render's placement reads cluster.ranks_per_gpu
    cfg = from_dict({"sites": {"count": 2, "ranks": 2}, "launch": {"slots": 2}, "site": {"backend": "torch"},
                     "cluster": {"nodes": 1, "sockets_per_node": 1, "cores_per_socket": 9, "gpus_per_node": 1,
                                 "ranks_per_gpu": 4}})
    from hpcfl.cluster.render import cluster_places
    assert [x.gpu for x in cluster_places(cfg)[1:]] == [0] * 4


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
    raw = {"sites": {"count": 5, "ranks": 2}, "cluster": {"nodes": 1, "gpus_per_node": 8}}
    cfg = from_dict({**raw, "launch": {"slots": 5}}, "c.yaml")  # one slot per site, asked for explicitly
    with pytest.raises(ConfigError, match=r"^cluster: the sites need 10 ranks but 1 node\(s\) give 8 \(one rank per GPU\)"):
        render_sbatch(cfg, "c.yaml")
    r = hpcfl("render", "configs/cluster-gpu.yaml", "--set", "cluster.nodes=1", "--set", "sites.count=5",
              "--set", "launch.slots=5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "need 10 ranks" in r.stderr
    # left to itself, render gives the 5 sites the 4 slots of 2 GPU ranks that the node has
    auto = from_dict(raw, "c.yaml")
    assert cluster_slots(auto) == 4
    assert "#SBATCH --ntasks=9" in render_sbatch(auto, "c.yaml")
    r = hpcfl("render", "configs/cluster-gpu.yaml", "--set", "cluster.nodes=1", "--set", "sites.count=5")
    assert r.returncode == 0 and "hpcfl: 5 site(s) on 4 slot(s) (each trains 1-2 sites in turn" in r.stderr
    # a site bigger than a node never fits, whatever the slots
    with pytest.raises(ConfigError):
        render_sbatch(from_dict({"sites": {"count": 2, "ranks": 9}, "cluster": {"nodes": 1, "gpus_per_node": 8}},
                                "c.yaml"), "c.yaml")


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


# -- a place the node cannot give (hpcfl/cluster/nodecheck.py) ----------------------------------

from hpcfl.cluster.nodecheck import (NodeFacts, NodeMismatch, check_place, count_gpus, fill_node_shape,  # noqa: E402
                                     parse_gres_gpus, parse_scontrol_nodes, shape_of_nodes)


def places_of(cluster: dict, sites=({"name": "a", "ranks": 2},)):
    from hpcfl.cluster.render import cluster_places

    cfg = from_dict({"sites": list(sites), "cluster": cluster}, "c.yaml")
    return cfg.cluster, cluster_places(cfg)


def test_a_node_with_fewer_cores_than_the_config_names_the_key():
    c, places = places_of({"sockets_per_node": 1, "cores_per_socket": 8, "cores_per_rank": 2, "aggregator_cores": 1})
    vm = NodeFacts("vm", cpus=(0, 1), node_cpus=2, gpus=0)
    with pytest.raises(NodeMismatch) as e:
        check_place(c, places[2], vm)
    assert str(e.value) == "cluster.cores_per_socket is 8 but node vm has 2 CPUs (rank 2 was placed on cores 3-4)"
    with pytest.raises(NodeMismatch, match=r"^cluster.cores_per_socket is 8 but node vm has 2 CPUs \(rank 0 "):
        check_place(c, places[0], vm)  # every rank on the node sees it, not only the one that would crash
    check_place(c, places[2], NodeFacts("big", cpus=tuple(range(8)), node_cpus=8, gpus=0))
    c, places = places_of({"sockets_per_node": 2, "cores_per_socket": 4})
    with pytest.raises(NodeMismatch, match=r"^cluster.cores_per_socket is 4 \(x 2 sockets_per_node = 8 cores\) but"):
        check_place(c, places[1], NodeFacts("vm", cpus=(0, 1, 2, 3), node_cpus=4, gpus=0))
    c, places = places_of({"sockets_per_node": 4, "cores_per_socket": 1})
    with pytest.raises(NodeMismatch, match=r"^cluster.sockets_per_node is 4 but node vm has 2 CPUs"):
        check_place(c, places[1], NodeFacts("vm", cpus=(0, 1), node_cpus=2, gpus=0))


def test_a_shape_left_out_says_it_is_the_default():
    c, places = places_of({"nodes": 1})
    with pytest.raises(NodeMismatch, match=r"^cluster.cores_per_socket is 16 \(the default: the config leaves it out\)"):
        check_place(c, places[1], NodeFacts("vm", cpus=(0, 1), node_cpus=2, gpus=0))


def test_cpus_the_process_may_not_use():
    c, places = places_of({"sockets_per_node": 1, "cores_per_socket": 4, "cores_per_rank": 1, "aggregator_cores": 0})
    with pytest.raises(NodeMismatch, match=r"^cluster: rank 2 was placed on cores 1 but this process may use only "
                                           r"CPUs 0,2,3,5 of node vm"):
        check_place(c, places[2], NodeFacts("vm", cpus=(0, 2, 3, 5), node_cpus=4, gpus=0))
    # bound by the launcher to fewer CPUs than the node has: its binding stands, nothing to check
    check_place(c, places[2], NodeFacts("vm", cpus=(3,), node_cpus=4, gpus=0))


def test_gpus_the_node_does_not_show():
    c, places = places_of({"sockets_per_node": 2, "cores_per_socket": 4, "gpus_per_node": 8, "aggregator_cores": 0},
                          sites=[{"name": "a", "ranks": 7}])
    two = NodeFacts("vm", cpus=tuple(range(8)), node_cpus=8, gpus=2)
    with pytest.raises(NodeMismatch) as e:
        check_place(c, places[5], two)
    assert str(e.value) == "cluster.gpus_per_node is 8 but node vm shows 2 GPUs (rank 5 was placed on GPU 4)"
    with pytest.raises(NodeMismatch, match=r"^cluster.gpus_per_node is 8 but node vm shows no GPU$"):
        check_place(c, places[0], NodeFacts("vm", cpus=tuple(range(8)), node_cpus=8, gpus=0))
    check_place(c, places[5], NodeFacts("vm", cpus=tuple(range(8)), node_cpus=8, gpus=8))
    # the launcher chose the visible GPUs (one per rank): one is enough, none is not
    check_place(c, places[5], NodeFacts("vm", cpus=tuple(range(8)), node_cpus=8, gpus=1, gpus_bound=True))
    with pytest.raises(NodeMismatch, match=r"rank 5 on node vm sees no GPU"):
        check_place(c, places[5], NodeFacts("vm", cpus=tuple(range(8)), node_cpus=8, gpus=0, gpus_bound=True))


def test_count_gpus_without_cuda(tmp_path):
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == (3, True)
    assert count_gpus({"CUDA_VISIBLE_DEVICES": ""}) == (0, True)
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == (1, True)  # CUDA stops at an invalid id
    proc = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (proc / bus).mkdir(parents=True)
    assert count_gpus({}, proc=proc, dev=tmp_path) == (2, False)
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).mkdir(parents=True)
    assert count_gpus({}, proc=tmp_path / "none", dev=tmp_path / "dev") == (3, False)


# `scontrol --oneliner show node` as SLURM 22.05 prints it (the fields hpcfl reads; OS= holds spaces)
SCONTROL_CPU = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=2 CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=0.08 AvailableFeatures=(null) "
    "ActiveFeatures=(null) Gres=(null) NodeAddr=vm NodeHostName=vm Version=22.05.8 OS=Linux 6.1.0-13-amd64 #1 SMP "
    "PREEMPT_DYNAMIC Debian 6.1.55-1 (2023-09-29)  RealMemory=20000 AllocMem=0 FreeMem=21000 Sockets=1 Boards=1 "
    "State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  "
    "BootTime=2026-11-30T08:00:00 SlurmdStartTime=2026-12-01T09:00:00 CfgTRES=cpu=2,mem=20000M,billing=2 AllocTRES= "
    "CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s\n")
SCONTROL_GPU = "".join(
    f"NodeName=gn{i:02d} Arch=x86_64 CoresPerSocket=18 CPUAlloc=0 CPUTot=72 Gres=gpu:v100:8(S:0-1) "
    f"NodeAddr=gn{i:02d} Sockets=2 Boards=1 State=IDLE ThreadsPerCore=2 Partitions=gp1d,gtest RealMemory=770000\n"
    for i in range(3)) + \
    "NodeName=cn01 Arch=x86_64 CoresPerSocket=28 CPUTot=56 Gres=(null) Sockets=2 Boards=1 State=IDLE Partitions=cpu\n"


def test_node_shapes_from_scontrol_output():
    assert parse_gres_gpus("gpu:8") == 8 and parse_gres_gpus("gpu:a100:4(S:0-1),gpu:t4:2") == 6
    assert parse_gres_gpus("(null)") == 0 and parse_gres_gpus("mps:100,gpu:v100:2(S:0)") == 2
    nodes = parse_scontrol_nodes(SCONTROL_GPU)
    assert [n["NodeName"] for n in nodes] == ["gn00", "gn01", "gn02", "cn01"]
    assert shape_of_nodes(nodes, "gp1d") == ((2, 18, 8), "3 node(s) of partition gp1d")
    assert shape_of_nodes(nodes, "cpu")[0] == (2, 28, 0)
    assert shape_of_nodes(nodes)[0] == (2, 18, 0)  # shapes differ: the smallest of each
    assert shape_of_nodes(nodes, "nope")[0] is None
    assert shape_of_nodes(parse_scontrol_nodes(SCONTROL_CPU))[0] == (1, 2, 0)


def fake_slurm(tmp_path, output: str, rc: int = 0) -> str:
    """A `scontrol` on PATH that prints recorded output (and records that it ran)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (tmp_path / "scontrol.out").write_text(output)
    script = bin_ / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\ncat {tmp_path}/scontrol.out\nexit {rc}\n")
    script.chmod(0o755)
    return str(bin_)


def test_render_reads_a_left_out_node_shape_from_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, SCONTROL_GPU) + os.pathsep + os.environ["PATH"])
    raw = {"sites": {"count": 4, "ranks": 2}, "cluster": {"partition": "gp1d"}}
    cfg, sets, line = fill_node_shape(from_dict(raw, "c.yaml"), ["fl.rounds=3"])
    assert (cfg.cluster.sockets_per_node, cfg.cluster.cores_per_socket, cfg.cluster.gpus_per_node) == (2, 18, 8)
    assert sets == ["fl.rounds=3", "cluster.sockets_per_node=2", "cluster.cores_per_socket=18", "cluster.gpus_per_node=8"]
    assert line == ("cluster: node shape from SLURM (scontrol show node, 3 node(s) of partition gp1d): 2 sockets x 18 "
                    "cores, 8 GPUs; the script sets cluster.sockets_per_node=2 cluster.cores_per_socket=18 "
                    "cluster.gpus_per_node=8")
    # a config that describes the node is left alone: SLURM is not asked
    (tmp_path / "scontrol.calls").unlink()
    same = from_dict({**raw, "cluster": {"cores_per_socket": 4}}, "c.yaml")
    assert fill_node_shape(same, []) == (same, [], "")
    assert not (tmp_path / "scontrol.calls").exists()


def test_render_cli_says_what_it_read_and_the_ranks_get_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sites: [{name: a, ranks: 1}]\ncluster: {aggregator_cores: 0, launcher: mpirun}\n")
    env = {"PATH": fake_slurm(tmp_path, SCONTROL_CPU) + os.pathsep + os.environ["PATH"]}
    r = hpcfl("render", cfg, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ("hpcfl: cluster: node shape from SLURM (scontrol show node, 1 node(s) of all partitions): "
                        "1 socket x 2 cores, no GPU; the script sets cluster.sockets_per_node=1 "
                        "cluster.cores_per_socket=2 cluster.gpus_per_node=0\n"
                        "hpcfl: 1 site(s) on 1 slot(s) (one per site)\n")
    assert "# on 1 node(s) of 1x2 cores; ranks per node: [2]." in r.stdout
    assert r.stdout.count("--set cluster.sockets_per_node=1 --set cluster.cores_per_socket=2 "
                          "--set cluster.gpus_per_node=0") == 3  # the header, the placement and every rank
    broken = {"PATH": fake_slurm(tmp_path, "scontrol: error: Could not establish a configuration source", rc=1)
              + os.pathsep + os.environ["PATH"]}
    r = hpcfl("render", cfg, env=broken)
    assert r.returncode == 0 and r.stderr.count("\n") == 2
    assert "SLURM could not tell it (scontrol show node: scontrol: error: Could not establish" in r.stderr
    assert "using sockets_per_node=2, cores_per_socket=16, gpus_per_node=0" in r.stderr
    assert "# on 1 node(s) of 2x16 cores" in r.stdout


def test_a_multi_node_job_is_warned_of_paths_in_node_local_folders(tmp_path):
    from hpcfl.cluster.render import node_local_paths

    two = {"sites": [{"name": "a"}], "cluster": {"nodes": 2}}
    cfg = from_dict({**two, "run": {"root": "runs"}, "cluster": {"nodes": 2, "python": "/tmp/venv/bin/python"}})
    assert node_local_paths(cfg, cwd=Path("/tmp/checkout")) == [
        "the submit directory /tmp/checkout", "run.root /tmp/checkout/runs", "cluster.python /tmp/venv/bin/python"]
    shared = from_dict({**two, "run": {"root": "/scratch/runs"}})
    assert node_local_paths(shared, cwd=Path("/home/me/hpcfl")) == []  # "python" is looked up on each node
    one = from_dict({"sites": [{"name": "a"}], "cluster": {"nodes": 1}})
    assert node_local_paths(one, cwd=Path("/tmp/checkout")) == []  # one node: /tmp is shared with itself
    # the CLI says it on stderr, one line per path, and still renders
    r = hpcfl("render", "configs/cluster-gpu.yaml", "--set", "cluster.nodes=2", "--set", "run.root=/dev/shm/runs")
    assert r.returncode == 0 and "#SBATCH" in r.stdout
    assert "warning: run.root /dev/shm/runs is in a folder that is usually node-local" in r.stderr


def test_the_placement_s_gpu_is_honoured_when_the_launcher_lists_several():
    from hpcfl.cluster.nodecheck import visible_device_for

    assert visible_device_for(None, 3, 4) == "3"  # nothing set: the placement's GPU alone
    assert visible_device_for("5", 3, 4) is None  # the launcher bound the rank to one GPU: kept
    # srun --gpus-per-node=8 --gpu-bind=none: every task sees the job's GPUs; the rank takes its placement's entry
    assert visible_device_for("0,1,2,3,4,5,6,7", 3, 4) == "3"
    assert visible_device_for("4,5,6,7", 1, 2) == "5"  # the job's share of a node: index into the list
    assert visible_device_for("GPU-aa,GPU-bb", 1, 2) == "GPU-bb"
    assert visible_device_for("", 0, 1) is None  # set and empty: check_place names it
    with pytest.raises(NodeMismatch, match=r"^cluster: rank 9 was placed on GPU 4 but CUDA_VISIBLE_DEVICES lists "
                                           r"only 2 GPUs \(0,1\); check cluster.gpus_per_node$"):
        visible_device_for("0,1", 4, 9)


def test_a_rank_pins_its_placement_s_gpu_out_of_the_launcher_s_list(monkeypatch):
    """Fails where a rank keeps CUDA_VISIBLE_DEVICES=0,...,7 and then picks a GPU round-robin by its index on the
    node: with ranks_per_gpu 2, rank 2 was placed on GPU 0 (next to its cores) but would train on GPU 1."""
    from hpcfl.cluster import render
    from hpcfl.cluster.placement import Place
    from hpcfl.runtime.startup import pin_rank

    cfg = from_dict({"sites": {"count": 2, "ranks": 2}, "site": {"backend": "torch"}})
    monkeypatch.setattr(render, "my_place", lambda cfg, rank, mode, groups: (
        Place(rank=rank, node=0, socket=0, cores=(), gpu=(rank - 1) // 2), None))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    pin_rank(cfg, 2, "local", [])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    pin_rank(cfg, 3, "local", [])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_placement_says_which_slots_will_use_nccl_and_which_gloo():
    r = hpcfl("placement", "configs/cluster-gpu.yaml")  # 8 GPUs, 4 sites x 2 ranks: a GPU per rank
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-4:] == [f"slot {i} (ranks {2 * i + 1}-{2 * i + 2}): nccl, every rank has its own GPU"
                                          for i in range(4)]
    r = hpcfl("placement", "configs/cluster-gpu.yaml", "--set", "cluster.ranks_per_gpu=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "slot 3 (ranks 7-8): gloo, ranks share GPU node0/gpu3"
    r = hpcfl("placement", "configs/cluster-cpu.yaml")  # CPU nodes: nothing to say
    assert r.returncode == 0 and "nccl" not in r.stdout and "gloo" not in r.stdout
