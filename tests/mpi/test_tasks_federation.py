"""Tasks as plug-ins under a real mpirun: a user's own task, known to nobody in hpcfl."""
import json

import pytest
from conftest import hpcfl

pytestmark = pytest.mark.usefixtures("need_mpirun")


def test_a_user_task_trains_evaluates_and_keeps_its_best_model(tmp_path):
    r = hpcfl("launch", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", "--set", "run.name=reg",
              "--set", "task=tests.regression_task:MeanIntensity", "--set", "task_args={hidden: 8}",
              "--set", "fl.rounds=4", "--set", "fl.local_steps=20", "--set", "train.lr=0.05", "--set", "launch.slots=2",
              "--set", "train.optimizer=adam", "--no-report", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "reg"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in recs if x["kind"] == "round"]
    mse = [x["val_mse"] for x in rounds]
    assert mse[-1] < 0.5 * mse[0], mse  # it learns
    assert "val_mse" in r.stdout and "val_acc" not in r.stdout  # the progress line shows the task's metric
    train = [x for x in recs if x.get("split") == "train" and x["round"] == 1]
    assert all("target_mean" in x and x["target_mean"] > 0 for x in train)  # the task's own training stats
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["metric"] == "val_mse" and summary["best"]["value"] == min(mse)  # smaller is better
    cross = json.loads((run / "cross_site.json").read_text())
    assert set(cross["models"]["global"]["hospital-a"]) == {"mse", "samples"}


def test_a_task_that_cannot_be_imported_is_one_line(tmp_path):
    r = hpcfl("launch", "configs/digits.yaml", "--set", f"run.root={tmp_path}", "--set", "task=nowhere.mod:Task",
              "--set", "fl.rounds=1", "--no-report", timeout=120)
    assert r.returncode != 0
    assert "task: cannot import 'nowhere.mod:Task'" in r.stderr
    assert "Traceback" not in r.stderr
