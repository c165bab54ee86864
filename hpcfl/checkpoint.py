"""Atomic, checksummed checkpoints of the global model and everything needed to resume.

A checkpoint is a ``.npz`` archive (no pickling, readable without torch):
``model/<name>`` arrays (the global model's float entries, a state_dict by
name), ``strategy/<key>`` arrays (the aggregation rule's state), ``meta``
(JSON: format, round, config hash, model signature, RNG state, the round's
metrics, and a SHA-256 of every array: dtype, shape and bytes) and
``meta.sha256`` (the SHA-256 of ``meta``). Loading verifies all of them, so a
truncated file or one flipped byte anywhere is a :class:`CorruptCheckpoint`,
never a silently different model; resuming then falls back to the previous
checkpoint (:mod:`hpcfl.rundir`).

Files are written through :func:`hpcfl.atomic.write_atomic` (temporary file,
fsync, rename, fsync of the directory): a crash or a full disk at any point
leaves either the new checkpoint or none, and the previous ones intact.

Load one into a torch model with :func:`to_state_dict` and
``model.load_state_dict(sd, strict=False)`` (integer buffers are not exchanged).
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .atomic import write_atomic
from .errors import CheckpointError

_NAME = re.compile(r"^round-(\d{6,})\.npz$")
FORMAT = 3  # 3: per-array SHA-256 in meta; 2 (no checksums) is still read
_READABLE = (2, 3)


class CorruptCheckpoint(CheckpointError):
    """The file is damaged (truncated, a flipped byte, not an archive): an older checkpoint may still serve."""


def checkpoint_path(directory: Path, round_: int) -> Path:
    return Path(directory) / f"round-{round_:06d}.npz"


def list_checkpoints(directory: Path) -> List[Path]:
    """Complete checkpoints, oldest first (temporary files and set-aside corrupt ones are never listed)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def array_digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    return h.hexdigest()


def save_checkpoint(directory: Path, round_: int, model: Dict[str, np.ndarray], meta: Dict[str, Any],
                    strategy: Optional[Dict[str, np.ndarray]] = None, keep: int = 2) -> Path:
    """Write the checkpoint of ``round_`` atomically; keep the newest ``keep``.

    A full disk (or quota, or file size limit) raises a CheckpointError naming the file and
    the previous checkpoint, which is left intact, as is every older one."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, round_)
    older = [p for p in list_checkpoints(d) if p != final]
    header = {"format": FORMAT, "round": round_, **meta}
    arrays = {f"model/{k}": np.asarray(v) for k, v in model.items()}
    arrays.update({f"strategy/{k}": np.asarray(v) for k, v in (strategy or {}).items()})
    intact = f"the previous checkpoint {older[-1].name} is intact" if older else "no earlier checkpoint exists"
    write_npz_atomic(final, arrays, header, what=intact)
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in d.glob(".round-*.npz.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    return final


def write_npz_atomic(path: Path, arrays: Dict[str, np.ndarray], meta: Dict[str, Any], what: str = "") -> Path:
    """An .npz (``meta`` as JSON bytes with every array's SHA-256, + arrays) written atomically.

    Raises CheckpointError in one line when the file cannot be written (a full disk says so)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta = {**meta, "sha256": {k: array_digest(v) for k, v in arrays.items()}}
    blob = json.dumps(meta).encode()
    all_arrays = {"meta": np.frombuffer(blob, dtype=np.uint8),
                  "meta.sha256": np.frombuffer(hashlib.sha256(blob).hexdigest().encode(), dtype=np.uint8),
                  **arrays}
    return write_atomic(Path(path), lambda f: np.savez(f, **all_arrays), error=CheckpointError, what=what)


def read_npz(path: Path) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(meta, arrays) of a file written by :func:`write_npz_atomic`, every checksum verified.

    Raises CorruptCheckpoint in one line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):  # np.load would guess at a pickle and say so
            raise CorruptCheckpoint(f"{path}: corrupt checkpoint (not a complete .npz archive: truncated?)")
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        blob = files.pop("meta").tobytes()
        digest = files.pop("meta.sha256", None)
        meta = json.loads(blob.decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except CorruptCheckpoint:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged archive raises (BadZipFile, ValueError, ...)
        raise CorruptCheckpoint(f"{path}: corrupt checkpoint ({_short(exc)})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{path}: corrupt checkpoint (its metadata is not a mapping)")
    if digest is not None and digest.tobytes().decode(errors="replace") != hashlib.sha256(blob).hexdigest():
        raise CorruptCheckpoint(f"{path}: corrupt checkpoint (the checksum of its metadata does not match)")
    sums = meta.pop("sha256", None)
    if sums is not None:
        if digest is None or not isinstance(sums, dict) or set(sums) != set(files):
            raise CorruptCheckpoint(f"{path}: corrupt checkpoint (its arrays do not match the list in its metadata)")
        for name, a in files.items():
            if array_digest(a) != sums[name]:
                raise CorruptCheckpoint(f"{path}: corrupt checkpoint (the checksum of {name} does not match)")
    return meta, files


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """{"round", "config_hash", ..., "model": {name: array}, "strategy": {key: array}}, checksums verified.

    A damaged file raises :class:`CorruptCheckpoint`; one of an unknown format a CheckpointError."""
    meta, files = read_npz(path)
    fmt = meta.get("format")
    if fmt not in _READABLE:
        raise CheckpointError(f"{path}: not an hpcfl checkpoint this version can read (format {fmt!r}, "
                              f"readable: {', '.join(map(str, _READABLE))}); relaunch with --restart to start over")
    if fmt >= 3 and "round" not in meta:
        raise CorruptCheckpoint(f"{path}: corrupt checkpoint (no round in its metadata)")
    meta["model"] = {k[6:]: v for k, v in files.items() if k.startswith("model/")}
    meta["strategy"] = {k[9:]: v for k, v in files.items() if k.startswith("strategy/")}
    return meta


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def to_state_dict(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The global model as a torch state_dict (float entries only)."""
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in ckpt["model"].items()}


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "to_state_dict",
           "write_npz_atomic", "read_npz", "CorruptCheckpoint", "FORMAT"]
