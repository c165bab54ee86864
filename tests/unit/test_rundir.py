import json

import numpy as np
import pytest
import yaml

from hpcfl.checkpoint import save_checkpoint
from hpcfl.config import config_hash, from_dict, to_dict
from hpcfl.errors import CheckpointError
from hpcfl.rundir import RunDir

BASE = {"sites": [{"name": "a"}, {"name": "b"}], "fl": {"rounds": 3}}


def run_with_checkpoint(tmp_path, raw_config):
    cfg = from_dict({**raw_config, "run": {"root": str(tmp_path), "name": "r"}})
    rd = RunDir(cfg)
    rd.prepare()
    save_checkpoint(rd.checkpoints, 2, {"w": np.zeros(2, np.float32)}, {"config_hash": config_hash(cfg), "records": []})
    return rd, cfg


def test_resume_allows_more_rounds_and_refuses_changed_training(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    more = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "r"}}, overrides=["fl.rounds=9"])
    assert RunDir(more).check()["round"] == 2
    lr = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "r"}}, overrides=["train.lr=0.7"])
    with pytest.raises(CheckpointError, match=r"different config \(train.lr: 0.05 -> 0.7\).*--restart"):
        RunDir(lr).check()
    assert RunDir(lr).check(restart=True) is None


def test_a_config_key_added_since_the_run_does_not_block_resume(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    old = to_dict(cfg)
    del old["model"]["conv_blocks"]  # as written by an hpcfl that did not know this key yet
    (rd.path / "config.yaml").write_text(yaml.safe_dump(old))
    assert RunDir(cfg).check()["round"] == 2


def test_restart_moves_the_old_run_aside(tmp_path):
    rd, cfg = run_with_checkpoint(tmp_path, BASE)
    (rd.path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    assert RunDir(cfg).prepare(restart=True) is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists()  # nothing lost


def test_resume_without_checkpoint_is_an_error(tmp_path):
    cfg = from_dict({**BASE, "run": {"root": str(tmp_path), "name": "fresh"}})
    with pytest.raises(CheckpointError, match="--resume given but there is no checkpoint"):
        RunDir(cfg).check(resume=True)
