"""``hpcfl submit`` compares the cluster section with the partition's nodes (``scontrol show node``) and refuses,
in one line naming the key and both values, a shape that cannot fit; inside the job, the placement step checks
the node it runs on before srun/mpirun start (configs/cluster-cpu.yaml on an 8-CPU node used to fail in mpirun
with ``ORTE_ERROR_LOG: Not found in file rmaps_rank_file.c``, naming no key)."""
import os

import pytest

from conftest import hpcfl
from hpcfl.cluster.nodecheck import NodeFacts, NodeMismatch, check_fit, check_node, mem_mb, parse_scontrol_nodes
from hpcfl.config import from_dict, load_config
from hpcfl.errors import ConfigError
from test_cluster import SCONTROL_CPU, SCONTROL_GPU, fake_slurm

LOCAL = ("NodeName=vm Arch=x86_64 CoresPerSocket=8 CPUAlloc=0 CPUTot=8 Gres=(null) NodeAddr=vm Sockets=1 Boards=1 "
         "State=IDLE ThreadsPerCore=1 RealMemory=4000 Partitions=debug\n")


def cfg_of(cluster, sites=({"name": "a", "ranks": 2},)):
    return from_dict({"sites": sites if isinstance(sites, dict) else list(sites), "cluster": cluster}, "c.yaml")


def refused(cfg, text):
    with pytest.raises(NodeMismatch) as e:
        check_fit(cfg, parse_scontrol_nodes(text))
    return str(e.value)


def test_the_cpu_config_on_the_local_cluster_names_the_key_and_both_values():
    cfg = load_config("configs/cluster-cpu.yaml", ["cluster.partition=debug"])
    assert refused(cfg, LOCAL) == ("cluster.cores_per_socket is 28 (x 2 sockets_per_node = 56 cores) but the nodes of "
                                   "partition debug have at most 8 CPUs (scontrol show node)")
    fits = cfg_of({"sockets_per_node": 1, "cores_per_socket": 8, "partition": "debug", "mem_per_node": "4000M"})
    check_fit(fits, parse_scontrol_nodes(LOCAL))


def test_sockets_gpus_memory_nodes_and_partition():
    assert refused(cfg_of({"sockets_per_node": 4, "cores_per_socket": 2}), SCONTROL_CPU) == \
        "cluster.sockets_per_node is 4 but the nodes of the cluster have at most 2 CPUs (scontrol show node)"
    gpu = {"sockets_per_node": 2, "cores_per_socket": 18, "partition": "gp1d"}
    assert refused(cfg_of({**gpu, "gpus_per_node": 16}), SCONTROL_GPU) == \
        "cluster.gpus_per_node is 16 but the nodes of partition gp1d have at most 8 GPUs (scontrol show node)"
    assert refused(cfg_of({**gpu, "gpus_per_node": 8, "mem_per_node": "1T"}), SCONTROL_GPU) == \
        ("cluster.mem_per_node is 1T (1048576 MiB) but the nodes of partition gp1d have at most 770000 MiB of "
         "RealMemory (scontrol show node)")
    assert refused(cfg_of({**gpu, "gpus_per_node": 8, "nodes": 4}, {"count": 4, "ranks": 8}), SCONTROL_GPU) == \
        "cluster.nodes is 4 but partition gp1d has 3 node(s) with 36 CPUs, 8 GPUs (of 3)"
    check_fit(cfg_of({**gpu, "gpus_per_node": 8, "nodes": 3}, {"count": 3, "ranks": 8}),
              parse_scontrol_nodes(SCONTROL_GPU))
    assert refused(cfg_of({**gpu, "partition": "big"}), SCONTROL_GPU) == \
        "cluster.partition is 'big' but SLURM has no node in it (scontrol show node)"
    # the default shape (2 x 16) on 56-core nodes of partition cpu fits; on the GPU nodes' 36 CPUs it does too
    check_fit(cfg_of({"partition": "cpu", "cores_per_socket": 16}), parse_scontrol_nodes(SCONTROL_GPU))


def test_memory_sizes_as_slurm_reads_them():
    assert [mem_mb(x) for x in ("4000", "4000M", "120G", "1T", "2048K", "0")] == [4000, 4000, 122880, 1048576, 2, 0]
    with pytest.raises(ConfigError, match=r"cluster.mem_per_node: '12 GB please' is not a memory size"):
        mem_mb("12 GB please")


def test_submit_refuses_before_sbatch(tmp_path):
    env = {"PATH": fake_slurm(tmp_path, LOCAL) + os.pathsep + os.environ["PATH"]}
    (tmp_path / "bin" / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/sbatch-called\necho 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    r = hpcfl("submit", "configs/cluster-cpu.yaml", "--set", "cluster.partition=debug", "--set", f"run.root={tmp_path}",
              env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "hpcfl: cluster.cores_per_socket is 28 (x 2 sockets_per_node = 56 cores) but the nodes of partition debug "
        "have at most 8 CPUs (scontrol show node)"), r.stderr
    assert not (tmp_path / "sbatch-called").exists()


def test_the_job_checks_its_node_before_the_launcher_starts(tmp_path):
    cfg = load_config("configs/cluster-cpu.yaml")
    with pytest.raises(NodeMismatch, match=r"^cluster.cores_per_socket is 28 \(x 2 sockets_per_node = 56 cores\) but "
                                           r"node vm has 8 CPUs$"):
        check_node(cfg.cluster, NodeFacts("vm", cpus=tuple(range(8)), node_cpus=8, gpus=0))
    check_node(cfg.cluster, NodeFacts("big", cpus=tuple(range(56)), node_cpus=56, gpus=0))
    nodes = tmp_path / "nodes"
    nodes.write_text("vm\n")
    # `hpcfl placement` inside a job (SLURM_JOB_ID set) is the step that checks: ends the job before mpirun
    r = hpcfl("placement", "configs/cluster-cpu.yaml", "--set", "cluster.nodes=1", "--nodes-file", nodes,
              "--format", "rankfile", env={"SLURM_JOB_ID": "8"})
    assert r.returncode == 2 and not r.stdout, r.stdout
    assert r.stderr.startswith("hpcfl: cluster.cores_per_socket is 28 (x 2 sockets_per_node = 56 cores) but node "), \
        r.stderr
    r = hpcfl("placement", "configs/cluster-cpu.yaml", "--set", "cluster.nodes=1", "--nodes-file", nodes,
              "--format", "rankfile", env={"SLURM_JOB_ID": ""})
    assert r.returncode == 0 and r.stdout.startswith("rank 0=vm slot="), r.stderr  # outside a job: text only
