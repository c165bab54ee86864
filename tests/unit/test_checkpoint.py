import numpy as np
import pytest

import hpcfl.checkpoint as ck
from hpcfl.errors import CheckpointError


def save(d, r, v, keep=2):
    return ck.save_checkpoint(d, r, {"0.weight": np.full((2, 2), v, np.float32), "0.bias": np.zeros(2, np.float32)},
                              {"config_hash": "h", "rng": {"state": 1}}, strategy={"m": np.arange(3.0)}, keep=keep)


def test_roundtrip_and_keep(tmp_path):
    for r in range(1, 5):
        save(tmp_path, r, float(r))
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["round-000003.npz", "round-000004.npz"]
    c = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert c["round"] == 4 and c["config_hash"] == "h" and c["rng"] == {"state": 1}
    np.testing.assert_array_equal(c["model"]["0.weight"], np.full((2, 2), 4.0))
    np.testing.assert_array_equal(c["strategy"]["m"], [0, 1, 2])
    sd = ck.to_state_dict(c)
    assert sd["0.weight"].shape == (2, 2) and float(sd["0.weight"].sum()) == 16.0


def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save(tmp_path, 1, 1.0)
    real = np.savez

    def dying_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk...
        raise KeyboardInterrupt("killed mid-write")  # ...then the process dies

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, 2.0)
    monkeypatch.setattr(np, "savez", real)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["round-000001.npz"]
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["round"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_stale_temporary_file_is_ignored_then_cleaned(tmp_path):
    (tmp_path / ".round-000007.npz.tmp-999").write_bytes(b"garbage")  # a process SIGKILLed mid-write
    assert ck.latest_checkpoint(tmp_path) is None
    save(tmp_path, 1, 1.0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "round-000001.npz"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"round-000001.npz: cannot load checkpoint"):
        ck.load_checkpoint(p)
