import numpy as np
import pytest
import torch

import hpcfl.checkpoint as ck
from hpcfl.errors import CheckpointError


def payload(v):
    return {"model": {"w": torch.full((4,), float(v))}, "config_hash": "h"}


def test_roundtrip_and_keep(tmp_path):
    for r in range(1, 5):
        ck.save_checkpoint(tmp_path, r, payload(r), keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["round-000003.pt", "round-000004.pt"]
    c = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert c["round"] == 4 and torch.equal(c["model"]["w"], torch.full((4,), 4.0))


def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, payload(1))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk...
        raise KeyboardInterrupt("killed mid-write")  # ...then the process dies

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, payload(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["round-000001.pt"]
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["round"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_stale_temporary_file_is_ignored_then_cleaned(tmp_path):
    (tmp_path / ".round-000007.pt.tmp-999").write_bytes(b"garbage")  # a process SIGKILLed mid-write
    assert ck.latest_checkpoint(tmp_path) is None
    ck.save_checkpoint(tmp_path, 1, payload(1))
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "round-000001.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"round-000001.pt: cannot load checkpoint"):
        ck.load_checkpoint(p)
