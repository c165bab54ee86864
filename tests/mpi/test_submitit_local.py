"""The submitit API without SLURM: its local executor runs the federation through mpirun."""
import pytest

import hpcfl

pytestmark = pytest.mark.usefixtures("need_mpirun")


def test_submitit_local_executor(tmp_path):
    job = hpcfl.submit("configs/digits.yaml", [f"run.root={tmp_path}", "fl.rounds=2"], executor="local",
                       folder=str(tmp_path / "submitit"))
    summary = job.result()
    assert summary["final"]["round"] == 2
    assert (tmp_path / "digits" / "checkpoints" / "round-000002.npz").exists()


def test_uneven_ranks_per_node_are_refused_for_submitit_slurm():
    from hpcfl.launch.submitit import submit
    from hpcfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cluster.nodes: submitit puts the same number of ranks on every node"):
        submit("configs/digits-2x2.yaml", ["cluster.nodes=2"], executor="slurm", folder="/tmp/hpcfl-unused")
