"""Was a killed rank killed for memory? The cgroup (v1 and v2) and machine-wide OOM counters, read before the
launch and after the failure, and the lines that name the cause."""
from hpcfl.cluster.slurm import JobStatus
from hpcfl.config import from_dict
from hpcfl.launch import failure_line
from hpcfl.oom import MemoryCgroup, OomCounters, killed_for_memory, memory_cgroup

KILLED = "mpirun noticed that process rank 3 with PID 0 on node vm exited on signal 9 (Killed).\n"


def fake_tree(tmp_path, version):
    root = tmp_path / "cg"
    if version == 1:
        d = root / "memory" / "job_8" / "step_0"
        d.mkdir(parents=True)
        (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
        (d / "memory.limit_in_bytes").write_text(str(4 << 30))
        proc = "12:pids:/job_8\n4:memory:/job_8/step_0\n0::/\n"
    else:
        d = root / "unified" / "system.slice" / "job_8"
        d.mkdir(parents=True)
        (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
        (d / "memory.max").write_text("max\n")
        proc = "0::/system.slice/job_8\n"
    (tmp_path / "cgroup").write_text(proc)
    return memory_cgroup(tmp_path / "cgroup", root), d


def test_the_memory_cgroup_of_a_process_v1_and_v2(tmp_path):
    cg, d = fake_tree(tmp_path / "a", 1)
    assert cg == MemoryCgroup(d, 1) and cg.oom_kills() == 0 and cg.limit() == 4 << 30
    cg, d = fake_tree(tmp_path / "b", 2)
    assert cg == MemoryCgroup(d, 2) and cg.oom_kills() == 0 and cg.limit() is None  # "max": unlimited
    (tmp_path / "none").write_text("0::/\n")
    assert memory_cgroup(tmp_path / "none", tmp_path / "empty") is None


def test_an_oom_kill_between_two_readings_is_named_with_the_limit(tmp_path):
    cg, d = fake_tree(tmp_path, 1)
    before = OomCounters(cg, 0, 5)
    assert killed_for_memory(before, OomCounters(cg, 0, 5)) is None
    why = killed_for_memory(before, OomCounters(cg, 1, 6))
    assert why == f"its memory limit is 4.0 GiB (cgroup {d})"
    assert killed_for_memory(OomCounters(None, None, 5), OomCounters(None, None, 6)) == \
        "the kernel's out-of-memory killer ran: the machine ran out of memory"
    cfg = from_dict({"sites": [{"name": "hospital-a", "ranks": 2}, {"name": "hospital-b", "ranks": 2}]}, "c.yaml")
    line = failure_line(cfg, tmp_path / "run", KILLED, 137, 5, memory=why)
    assert line.startswith("hpcfl: rank 3 (site 'hospital-b', rank 0 of 2 in site) was killed for memory (signal 9): "
                           f"its memory limit is 4.0 GiB (cgroup {d}); lower train.batch_size or the ranks per node")
    assert failure_line(cfg, tmp_path / "run", KILLED, 137, 5) == \
        "hpcfl: rank 3 (site 'hospital-b', rank 0 of 2 in site) was killed by signal 9 (Killed)"


def test_slurms_out_of_memory_state_says_what_to_change():
    text = JobStatus("8", "OUT_OF_MEMORY", "sacct", "0:125", "OutOfMemory").describe()
    assert text.startswith("job 8: OUT_OF_MEMORY (signal 125, OutOfMemory); a rank was killed for memory: lower "
                           "train.batch_size or the ranks per node"), text
    assert "killed for memory" not in JobStatus("8", "FAILED", "sacct", "1:0").describe()



def test_a_task_killed_by_the_jobs_mem_limit_is_named_from_the_job_log(tmp_path):
    # what srun and slurmstepd write when the cgroup of --mem kills a task (Slurm 22.05, task/cgroup); the
    # job itself ends FAILED: its batch script's srun failed
    from hpcfl.cluster.slurm import oom_victim

    log = ("srun: error: vm: task 2: Out Of Memory\nslurmstepd-vm: error: Detected 1 oom-kill event(s) in "
           "StepId=43.0. Some of your processes may have been killed by the cgroup out-of-memory handler.\n")
    (tmp_path / "manifest.json").write_text('{"ranks": [{"rank": 0, "site": null}, {"rank": 2, "site": "hospital-b"}]}')
    assert oom_victim(log, tmp_path) == "rank 2 (site 'hospital-b')"
    assert oom_victim(log, None) == "rank 2"
    assert oom_victim(log.splitlines()[1], tmp_path) == "a rank"
    assert oom_victim("srun: error: vm: task 2: Killed\n", tmp_path) is None
    (tmp_path / "manifest.json").write_text("{damaged")
    assert oom_victim(log, tmp_path) == "rank 2"
    st = JobStatus("43", "FAILED", "scontrol", "1:0", "NonZeroExitCode", error_line="srun: error: vm: task 2: Out Of "
                   "Memory", memory="3G", oom="rank 2 (site 'hospital-b')")
    assert st.describe() == ("job 43: FAILED (exit code 1, NonZeroExitCode): srun: error: vm: task 2: Out Of Memory; "
                             "rank 2 (site 'hospital-b') was killed for memory: the job's limit is 3G per node (--mem); "
                             "lower train.batch_size or the ranks per node (launch.slots, cluster.cores_per_rank), or "
                             "give the job more memory (cluster.mem_per_node under SLURM)")
