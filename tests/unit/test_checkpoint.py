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
    with pytest.raises(ck.CorruptCheckpoint, match=r"round-000001.npz: corrupt checkpoint \(not a complete .npz archive"):
        ck.load_checkpoint(p)


def _rewrite_member(path, member, change):
    """Rewrite one archive member with valid zip CRCs: only hpcfl's own checksums can notice."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[member] = change(members[member])
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


def test_a_changed_array_fails_its_checksum(tmp_path):
    p = save(tmp_path, 1, 1.0)
    _rewrite_member(p, "model/0.weight.npy", lambda b: b[:-4] + np.float32(7.0).tobytes())
    with pytest.raises(ck.CorruptCheckpoint, match=r"checksum of model/0.weight does not match"):
        ck.load_checkpoint(p)
    p = save(tmp_path, 2, 1.0)
    _rewrite_member(p, "meta.npy", lambda b: b.replace(b'"round": 2', b'"round": 9'))
    with pytest.raises(ck.CorruptCheckpoint, match=r"checksum of its metadata does not match"):
        ck.load_checkpoint(p)


def test_one_flipped_byte_anywhere_is_caught_or_harmless(tmp_path):
    p = save(tmp_path, 1, 1.0)
    good = p.read_bytes()
    ref = ck.load_checkpoint(p)
    caught = 0
    for i in range(0, len(good), 3):
        flipped = bytearray(good)
        flipped[i] ^= 0x10
        p.write_bytes(bytes(flipped))
        try:
            c = ck.load_checkpoint(p)
        except ck.CorruptCheckpoint:
            caught += 1
            continue
        # a flip in a part no reader uses (a timestamp, an unused header field): the content is intact
        assert c["round"] == 1 and c["rng"] == ref["rng"], i
        for part in ("model", "strategy"):
            for k, v in ref[part].items():
                np.testing.assert_array_equal(c[part][k], v)
    assert caught > len(good) // 3 * 0.7  # most bytes are content, headers or names


def test_truncated_at_any_length_is_corrupt(tmp_path):
    p = save(tmp_path, 1, 1.0)
    good = p.read_bytes()
    for n in list(range(0, len(good), 97)) + [len(good) - 1]:
        p.write_bytes(good[:n])
        with pytest.raises(ck.CorruptCheckpoint):
            ck.load_checkpoint(p)


def test_format_2_is_still_read_and_unknown_formats_are_refused(tmp_path):
    import json

    p = tmp_path / "round-000003.npz"
    meta = {"format": 2, "round": 3, "config_hash": "h"}
    with open(p, "wb") as f:  # as hpcfl wrote checkpoints before checksums
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **{"model/w": np.ones(2)})
    c = ck.load_checkpoint(p)
    assert c["round"] == 3 and list(c["model"]["w"]) == [1.0, 1.0]
    ck.write_npz_atomic(p, {"model/w": np.ones(2)}, {"format": 99, "round": 3})
    with pytest.raises(CheckpointError, match=r"format 99.*--restart") as e:
        ck.load_checkpoint(p)
    assert not isinstance(e.value, ck.CorruptCheckpoint)  # not damaged: no fallback to an older one


FULL_DISK = """
import resource, signal, sys
import numpy as np
from hpcfl.checkpoint import save_checkpoint
from hpcfl.errors import CheckpointError

d = sys.argv[1]
save_checkpoint(d, 1, {"w": np.zeros(16, np.float32)}, {"config_hash": "h"})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
try:
    save_checkpoint(d, 2, {"w": np.zeros(100_000, np.float32)}, {"config_hash": "h"})
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    line = r.stdout.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in r.stderr
    assert "round-000002.npz: cannot write: the disk or quota is full" in line and "File too large" in line
    assert "the previous checkpoint round-000001.npz is intact" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001.npz"]  # no temporary file left
    assert ck.load_checkpoint(tmp_path / "round-000001.npz")["round"] == 1
