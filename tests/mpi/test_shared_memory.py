"""launch.shared_memory under a real mpirun: the sums and the global model through one MPI shared-memory
window where the federation is on one node, against the same runs through MPI's Reduce and Bcast.

With 2 slots the window's sum is the Reduce's (a + b either way): bit-identical weights every round, also
with several sites per slot (the fused upload of a later site) and with slots of 2 ranks (the leader copies,
the others get Horovod's broadcast). With 3 slots the window sums in slot order where Open MPI's Reduce picks
its own: the same weights to float tolerance. summary.json says which way the models went.
"""
import json

import numpy as np
import pytest
from conftest import hpcfl
from hpcfl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("need_mpirun")

FAST = ["fl.local_steps=3", "train.batch_size=16", "eval.cross_site=false", "checkpoint.keep=5"]


def launch(tmp_path, name, *sets, config="configs/digits.yaml", rounds=3):
    r = hpcfl("launch", config, "--no-report", "--set", f"run.root={tmp_path}", "--set", f"run.name={name}",
              "--set", f"fl.rounds={rounds}", *[a for s in (*FAST, *sets) for a in ("--set", s)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def weights(tmp_path, name, r):
    return load_checkpoint(tmp_path / name / "checkpoints" / f"round-{r:06d}.npz")["model"]


def pair(tmp_path, name, *sets, **kw):
    on = launch(tmp_path, f"{name}-shm", *sets, **kw)
    off = launch(tmp_path, f"{name}-mpi", *sets, "launch.shared_memory=false", **kw)
    assert on["shared_memory"] is True and off["shared_memory"] is False
    return f"{name}-shm", f"{name}-mpi"


@pytest.mark.parametrize("case", ["two slots, two sites each, fedprox", "two slots of two ranks"])
def test_the_window_gives_the_reduces_weights_bit_for_bit(tmp_path, case):
    if case.startswith("two slots, two"):
        sets, kw = ["sites={count: 4, ranks: 1}", "launch.slots=2", "fl.strategy=fedprox",
                    "sites.2.overrides.local_steps=1"], {}
    else:
        sets, kw = ["launch.slots=2"], {"config": "configs/digits-2x2.yaml"}
    a, b = pair(tmp_path, "run", *sets, **kw)
    for r in (1, 2, 3):
        wa, wb = weights(tmp_path, a, r), weights(tmp_path, b, r)
        for k in wa:
            assert np.array_equal(wa[k], wb[k]), (case, r, k)
    ma = [json.loads(x) for x in (tmp_path / a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / b / "metrics.jsonl").read_text().splitlines()]
    norms = [(x["update_norm"], y["update_norm"]) for x, y in zip(ma, mb) if x["kind"] == "site" and "update_norm" in x]
    assert norms and all(x == pytest.approx(y, rel=1e-6) for x, y in norms)


def test_three_slots_and_a_server_optimizer_agree_to_float_tolerance(tmp_path):
    a, b = pair(tmp_path, "three", "sites={count: 3, ranks: 1}", "launch.slots=3", "fl.strategy=fedadam",
                "fl.server.lr=0.05", rounds=2)
    for r in (1, 2):
        wa, wb = weights(tmp_path, a, r), weights(tmp_path, b, r)
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=f"round {r} {k}")


def test_secure_aggregation_keeps_mpi(tmp_path):
    s = launch(tmp_path, "sa", "privacy.secure_aggregation=true", rounds=1)
    assert s["shared_memory"] is False
