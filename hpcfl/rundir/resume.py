"""The resume check: which checkpoint a launch continues from, or why it cannot.

A run resumes from its newest checkpoint that loads and verifies; it is refused when the run directory's
config differs from the launch's in anything that changes the training trajectory
(:func:`hpcfl.config.trajectory_dict`), naming the keys that changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ..checkpoint import CorruptCheckpoint, list_checkpoints, load_checkpoint
from ..config import Config, config_hash, from_dict, trajectory_dict
from ..errors import CheckpointError, HpcflError
from .errors import warn
from .paths import RunPaths


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and any(isinstance(v, dict) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def config_diff(old: dict, new: dict, limit: int = 4) -> str:
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def latest_valid(paths: RunPaths, corrupt: List[Tuple[Path, str]]) -> Optional[Dict[str, Any]]:
    """The newest checkpoint that loads and verifies; corrupt newer ones are appended to ``corrupt``."""
    found = list_checkpoints(paths.checkpoints)
    for p in reversed(found):
        try:
            ckpt = load_checkpoint(p)
        except CorruptCheckpoint as exc:
            corrupt.append((p, str(exc).split(": corrupt checkpoint ", 1)[-1]))
            continue
        ckpt["path"] = str(p)
        return ckpt
    if corrupt:
        names = ", ".join(p.name for p, _ in corrupt)
        raise CheckpointError(f"{paths.checkpoints}: no valid checkpoint to resume from ({names}: "
                              f"{corrupt[0][1]}); relaunch with --restart to start over (the old run is kept aside)")
    return None


def old_config(paths: RunPaths) -> Optional[dict]:
    """The run's config.yaml as a dict, or None when it is missing or damaged (the checkpoint's hash decides then)."""
    old_path = paths.config
    try:
        raw = yaml.safe_load(old_path.read_bytes().decode())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        warn(f"{old_path} is unreadable; the checkpoint's config hash decides whether the run can resume")
        return None
    return raw if isinstance(raw, dict) else None


def check_same_run(paths: RunPaths, cfg: Config, ckpt: Dict[str, Any]) -> None:
    """Refuse to resume ``ckpt`` under a config that would not have trained its rounds."""
    want = config_hash(cfg)
    old_raw = old_config(paths)
    try:  # re-read through today's schema: keys added since the run take their defaults
        have = config_hash(from_dict(old_raw, str(paths.config))) if old_raw else ckpt.get("config_hash")
    except HpcflError:
        have = ckpt.get("config_hash")
    if have != want:
        diff = config_diff(trajectory_dict(old_raw), trajectory_dict(cfg)) if old_raw else ""
        raise CheckpointError(
            f"{paths.path} holds a run of a different config ({diff or 'hash ' + str(have)}); "
            f"relaunch with --restart to start over (the old run is kept aside) or --set run.name=NEW"
        )


def fallback_line(paths: RunPaths, corrupt: List[Tuple[Path, str]], ckpt: Optional[Dict[str, Any]]) -> str:
    """The one warning line for corrupt checkpoints passed over ('' when none)."""
    if not corrupt or ckpt is None:
        return ""
    bad = ", ".join(p.name for p, _ in corrupt)
    return (f"{paths.checkpoints}/{bad} {'is' if len(corrupt) == 1 else 'are'} corrupt ({corrupt[0][1]}); "
            f"resuming from {Path(ckpt['path']).name} (round {ckpt['round']}); set aside as *.corrupt")


__all__ = ["check_same_run", "config_diff", "fallback_line", "latest_valid", "old_config"]
