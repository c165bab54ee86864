"""The documented Python API: a config built and changed in Python (no YAML file) is launched, as a notebook
sweep would do it; the ranks read the written copy and train what the object says."""
import dataclasses
import io
import json

import hpcfl
import pytest
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("need_mpirun")


def test_a_config_object_changed_in_python_is_launched(tmp_path):
    base = hpcfl.load_config(ROOT / "configs" / "digits.yaml", [f"run.root={tmp_path}"])
    cfg = dataclasses.replace(base, fl=dataclasses.replace(base.fl, rounds=2),
                              train=dataclasses.replace(base.train, lr=0.05))
    out = io.StringIO()
    assert hpcfl.launch(cfg, ["run.name=lr0.05", "train.batch_size=16"], report=False, stdout=out) == 0, out.getvalue()
    run = tmp_path / "lr0.05"
    resolved = hpcfl.load_config(run / "config.yaml")  # what rank 0 resolved and trained
    assert (resolved.fl.rounds, resolved.train.lr, resolved.train.batch_size) == (2, 0.05, 16)
    assert json.loads((run / "summary.json").read_text())["final"]["round"] == 2
    assert str(run / "launch-config.yaml") in out.getvalue()  # the ranks read the written copy

    # the same as a dict, in the YAML's shape
    raw = {"sites": [{"name": "a", "ranks": 1}, {"name": "b", "ranks": 1}], "data": {"name": "digits"},
           "model": {"name": "mlp", "hidden": [32]}, "fl": {"rounds": 1},
           "run": {"root": str(tmp_path), "name": "from-dict"}}
    assert hpcfl.launch(raw, report=False, stdout=io.StringIO()) == 0
    assert json.loads((tmp_path / "from-dict" / "summary.json").read_text())["final"]["round"] == 1


def test_a_bad_config_object_is_one_clear_error(tmp_path):
    with pytest.raises(hpcfl.HpcflError, match="the config must be a YAML path, a hpcfl.Config or a dict, not int"):
        hpcfl.launch(3)
    with pytest.raises(hpcfl.HpcflError, match=r"<dict>: .*fl\.rounds"):
        hpcfl.launch({"sites": [{"name": "a"}], "fl": {"rounds": 0}, "run": {"root": str(tmp_path)}})
