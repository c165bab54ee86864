"""A node that becomes unreachable mid-run (its link to the others down: its processes live on, its heartbeats
still reach the shared filesystem, its MPI traffic does not): the job ends within the hang timeout, in one line
naming the node (its ranks no longer reach rank 0's probe port, hpcfl.reach), not a rank of the other node that
waits for it."""
import json
import subprocess
import time

from test_two_nodes import N2, cluster, submit  # noqa: F401 - cluster is a fixture

HANG_S = 30


def test_an_unreachable_node_ends_the_job_within_the_hang_timeout(cluster):  # noqa: F811
    env, root = cluster
    job = submit(cluster, "cut", "fl.rounds=400", f"fault.hang_min_s={HANG_S}")
    run = root / "cut"
    metrics = run / "metrics.jsonl"
    t = time.monotonic()
    while not (metrics.exists() and metrics.read_text().count('"kind": "round"') >= 3):
        assert time.monotonic() - t < 300, f"job {job} never reached round 3"
        time.sleep(0.5)
    subprocess.run(["ip", "link", "set", f"{N2}-br", "down"], check=True)  # the bridge port of node 2
    cut = time.monotonic()
    line = None
    while line is None:
        for p in (run / "logs").glob("rank-*.error.json"):
            line = json.loads(p.read_text())["line"]
        assert time.monotonic() - cut < 240, "no line in 240 s"
        time.sleep(1)
    print(f"after {time.monotonic() - cut:.0f}s: {line}")
    assert line.startswith(f"hpcfl: node {N2} is unreachable: its ranks 3, 4 (site hospital-b) still run but have "
                           "not reached rank 0's node hpcfl-n1 over the network for "), line
    assert "ending the job (fault.hang_timeout_s)" in line, line
