"""A node that becomes unreachable mid-run (its link to the others down: its processes live on, its heartbeats
still reach the shared filesystem, its MPI traffic does not): the job ends within the hang timeout, in one line
naming the node (its ranks no longer reach rank 0's probe port, hpcfl.reach), not a rank of the other node that
waits for it. Once the node is back, the same command resumes and ends bit-identical."""
import os
import subprocess
import time

import pytest

from test_lost_node import ending_line, resume_when_back, running
from test_two_nodes import N2, cluster  # noqa: F401 - cluster is a fixture

# Opt-in (HPCFL_TWO_NODE_FAULTS=1): on a fresh clone these node-fault runs twice ended with a false hang verdict
# ("rank 2 made no progress for 43s" at fault.hang_min_s 30 on 2 oversubscribed cores) and once restart-node
# could not reconnect the bridge; they pass on a quiet machine (docs/faults.md), not yet reliably in make test.
pytestmark = pytest.mark.skipif(os.environ.get("HPCFL_TWO_NODE_FAULTS") != "1",
                                reason="two-node fault runs are opt-in (HPCFL_TWO_NODE_FAULTS=1): not yet reliable on "
                                       "a loaded 2-core machine (docs/faults.md)")


def test_an_unreachable_node_ends_the_job_within_the_hang_timeout(cluster):  # noqa: F811
    job, run = running(cluster, "cut")
    subprocess.run(["ip", "link", "set", f"{N2}-br", "down"], check=True)  # node 2's port on the bridge
    line, found = ending_line(run, time.monotonic())
    print(f"after {found:.0f}s: {line}")
    assert line.startswith(f"hpcfl: node {N2} is unreachable: its ranks 3, 4 (site hospital-b) still run but have "
                           "not reached rank 0's node hpcfl-n1 over the network for "), line
    assert "ending the job (fault.hang_timeout_s)" in line, line
    resume_when_back(cluster, run, (run / "metrics.jsonl").read_text().count('"kind": "round"'))
