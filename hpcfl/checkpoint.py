"""Atomic checkpoints of the global model and everything needed to resume.

A checkpoint is written to a temporary file in the same directory, flushed,
fsync'ed and renamed over its final name, then the directory is fsync'ed: a
crash at any point leaves either the new checkpoint or none, and the previous
ones untouched. Files are ``round-000012.pt`` (``torch.load``-able; its
``"model"`` entry is a plain state_dict users can load into their module).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import CheckpointError

_NAME = re.compile(r"^round-(\d{6,})\.pt$")
FORMAT = 1


def checkpoint_path(directory: Path, round_: int) -> Path:
    return Path(directory) / f"round-{round_:06d}.pt"


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


def save_checkpoint(directory: Path, round_: int, payload: Dict[str, Any], keep: int = 2) -> Path:
    """Write ``payload`` as the checkpoint of ``round_`` atomically; keep the newest ``keep``."""
    import torch

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, round_)
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "round": round_, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in d.glob(".round-*.pt.tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> Dict[str, Any]:
    import torch

    try:
        with open(path, "rb") as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/IO problem is the same user-facing error
        raise CheckpointError(f"{path}: cannot load checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hpcfl checkpoint (format {FORMAT})")
    return ckpt


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None
