"""A node that becomes unreachable mid-run (its link to the others down: its processes live on, its heartbeats
still reach the shared filesystem, its MPI traffic does not): the job ends within the hang timeout, in one line
naming the node (its ranks no longer reach rank 0's probe port, hpcfl.reach), not a rank of the other node that
waits for it. Once the node is back, the same command resumes and ends bit-identical."""
import subprocess
import time

from test_lost_node import HELD, ending_line, resume_when_back, running
from test_two_nodes import N2, cluster  # noqa: F401 - cluster is a fixture


def test_an_unreachable_node_ends_the_job_within_the_hang_timeout(cluster):  # noqa: F811
    job, run, held, extra = running(cluster, "cut")
    subprocess.run(["ip", "link", "set", f"{N2}-br", "down"], check=True)  # node 2's port on the bridge
    cut = time.monotonic()
    held.unlink()  # round HELD starts: rank 0's plan cannot reach node 2, whose ranks wait, alive
    line, found = ending_line(run, cut)
    print(f"after {found:.0f}s: {line}")
    assert line.startswith(f"hpcfl: node {N2} is unreachable: its ranks 3, 4 (site hospital-b) still run but have "
                           "not reached rank 0's node hpcfl-n1 over the network for "), line
    assert "ending the job (fault.hang_timeout_s)" in line, line
    assert (run / "metrics.jsonl").read_text().count('"kind": "round"') == HELD - 1
    resume_when_back(cluster, run, extra)
