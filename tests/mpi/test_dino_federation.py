"""configs/dino.yaml under a real mpirun (aggregator + 2 sites of 2 ranks): rounds run and report the
probe metrics, and a run killed and resumed ends with the weights of an uninterrupted one."""
import json

import numpy as np
import pytest
from conftest import hpcfl
from hpcfl.checkpoint import read_npz

pytestmark = pytest.mark.usefixtures("need_mpirun")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """4 small synthetic slides and their index, shared by the tests of this module (built by the first run)."""
    d = tmp_path_factory.mktemp("dino-tiles")
    return [f"data.tiles.slides_dir={d}/slides", f"data.tiles.index_dir={d}/index",
            "data.tiles.synthesize={slides: 4, size: 2048, seed: 0}", "data.val_fraction=0.5"]


FAST = ["fl.local_steps=3", "train.batch_size=8", "dino.width=8", "dino.crops.local_crops=2", "eval.cross_site=false"]


def launch(tmp_path, tiles, name, *sets, rounds=2, timeout=400):
    args = [f"run.root={tmp_path}", f"run.name={name}", f"fl.rounds={rounds}", *tiles, *FAST, *sets]
    return hpcfl("launch", "configs/dino.yaml", *[a for s in args for a in ("--set", s)], timeout=timeout)


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_dino_config_runs_two_rounds_and_reports_probe_accuracy(tmp_path, tiles):
    r = launch(tmp_path, tiles, "dino")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = records(tmp_path / "dino")
    rounds = [x for x in recs if x["kind"] == "round"]
    assert [x["round"] for x in rounds] == [1, 2]
    for x in rounds:
        for key in ("val_knn_accuracy", "val_probe_accuracy"):
            assert 0.0 <= x[key] <= 1.0, (key, x)
    text = json.dumps(recs)
    assert "teacher_entropy" in text and "kl" in text  # the collapse watch reaches the records
    assert "val_knn_accuracy" in r.stdout  # the headline metrics on the progress lines


def _final_arrays(run, round_):
    _, arrays = read_npz(run / "checkpoints" / f"round-{round_:06d}.npz")
    return arrays


@pytest.mark.parametrize("exchange", [
    ["dino.exchange=student_teacher", "dino.center=averaged"],
    ["dino.exchange=student", "dino.center=kept"],  # teachers and centres stay at the sites: they must resume too
], ids=["all-exchanged", "site-teachers"])
def test_kill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiles, exchange):
    a = launch(tmp_path, tiles, "straight", *exchange, rounds=3)
    assert a.returncode == 0, a.stdout + a.stderr
    b = launch(tmp_path, tiles, "resumed", *exchange, "debug.inject_failure={rank: 0, round: 3, mode: kill}", rounds=3)
    assert b.returncode != 0
    c = launch(tmp_path, tiles, "resumed", *exchange, rounds=3)
    assert c.returncode == 0, c.stdout + c.stderr
    assert "resuming after round 2" in c.stdout
    wa, wc = _final_arrays(tmp_path / "straight", 3), _final_arrays(tmp_path / "resumed", 3)
    assert wa.keys() == wc.keys() and any("teacher" in k for k in wa)
    for k in wa:
        assert np.array_equal(wa[k], wc[k]), k  # bit-identical, site-kept state included
    metric = lambda run: [(x["round"], x["val_knn_accuracy"], x["val_probe_accuracy"])  # noqa: E731
                          for x in records(tmp_path / run) if x["kind"] == "round"]
    assert metric("resumed") == metric("straight")
