"""Atomic checkpoints of the global model and everything needed to resume.

A checkpoint is a ``.npz`` archive (no pickling, readable without torch):
``model/<name>`` arrays (the global model's float entries, a state_dict by
name), ``strategy/<key>`` arrays (the aggregation rule's state), and ``meta``
(JSON: round, config hash, model signature, RNG state, the round's metrics).
It is written to a temporary file in the same directory, flushed, fsync'ed and
renamed over its final name, then the directory is fsync'ed: a crash at any
point leaves either the new checkpoint or none, and the previous ones intact.

Load one into a torch model with :func:`to_state_dict` and
``model.load_state_dict(sd, strict=False)`` (integer buffers are not exchanged).
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .errors import CheckpointError

_NAME = re.compile(r"^round-(\d{6,})\.npz$")
FORMAT = 2


def checkpoint_path(directory: Path, round_: int) -> Path:
    return Path(directory) / f"round-{round_:06d}.npz"


def list_checkpoints(directory: Path) -> List[Path]:
    """Complete checkpoints, oldest first (temporary files are never listed)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: Path, round_: int, model: Dict[str, np.ndarray], meta: Dict[str, Any],
                    strategy: Optional[Dict[str, np.ndarray]] = None, keep: int = 2) -> Path:
    """Write the checkpoint of ``round_`` atomically; keep the newest ``keep``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, round_)
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    header = {"format": FORMAT, "round": round_, **meta}
    arrays = {f"model/{k}": np.asarray(v) for k, v in model.items()}
    arrays.update({f"strategy/{k}": np.asarray(v) for k, v in (strategy or {}).items()})
    write_npz_atomic(final, arrays, header, tmp=tmp)
    _fsync_dir(d)
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in d.glob(".round-*.npz.tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


def write_npz_atomic(path: Path, arrays: Dict[str, np.ndarray], meta: Dict[str, Any],
                     tmp: Optional[Path] = None) -> Path:
    """An .npz (``meta`` as JSON bytes + arrays) written to a temporary file, fsync'ed and renamed."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    all_arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays}
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **all_arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """{"round", "config_hash", ..., "model": {name: array}, "strategy": {key: array}}."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        meta = json.loads(bytes(files.pop("meta")).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot load checkpoint: {type(exc).__name__}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hpcfl checkpoint of format {FORMAT}")
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


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "to_state_dict"]
