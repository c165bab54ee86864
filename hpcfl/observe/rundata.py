"""Read a run directory for looking at it (``hpcfl status``, ``hpcfl report``): every file optional, a corrupt
one named in one line (:class:`RunDirError`), never a traceback.

metrics.jsonl is appended while the run lives, so a last line without its
newline is a write in progress and is skipped; any other line that is not a
JSON object is corruption and is named with its line number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import HpcflError
from ..rundir.paths import READ_FILES as FILES
from ..rundir.paths import RunPaths


class RunDirError(HpcflError):
    """A run directory is missing, empty, or holds a file that cannot be read; the message names it."""


def read_text(path: Path) -> Optional[str]:
    """The text of ``path`` (None if absent); RunDirError naming it if unreadable or not UTF-8."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: cannot read: {exc}") from None


def read_json(path: Path, kind: type = dict) -> Optional[Any]:
    """The JSON in ``path`` (None if absent); RunDirError naming the file if unreadable or of the wrong type."""
    text = read_text(path)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise RunDirError(f"{path}: corrupt (not JSON: {exc})") from None
    if not isinstance(doc, kind):
        raise RunDirError(f"{path}: corrupt (a JSON {kind.__name__} expected, found {type(doc).__name__})")
    return doc


def read_yaml(path: Path) -> Optional[Dict[str, Any]]:
    import yaml

    text = read_text(path)
    if text is None:
        return None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise RunDirError(f"{path}: corrupt (not YAML{at})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RunDirError(f"{path}: corrupt (a mapping expected, found {type(doc).__name__})")
    return doc


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Records of metrics.jsonl; a last line still being written is skipped, other bad lines are named."""
    lines = (read_text(path) or "").split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):  # no newline yet: rank 0 is writing it
                continue
            raise RunDirError(f"{path}: corrupt line {i} (not JSON)") from None
        if not isinstance(rec, dict):
            raise RunDirError(f"{path}: corrupt line {i} (a JSON object expected)")
        out.append(rec)
    return out


@dataclass
class RunData:
    """What a run directory holds, parsed."""
    path: Path
    config: Dict[str, Any] = field(default_factory=dict)
    manifest: Optional[Dict[str, Any]] = None
    records: List[Dict[str, Any]] = field(default_factory=list)
    summary: Optional[Dict[str, Any]] = None
    cross_site: Optional[Dict[str, Any]] = None

    @property
    def name(self) -> str:
        return str((self.config.get("run") or {}).get("name") or self.path.name)

    @property
    def rounds_total(self) -> Optional[int]:
        r = (self.config.get("fl") or {}).get("rounds")
        return r if isinstance(r, int) else None

    def rounds(self) -> List[Dict[str, Any]]:
        """The per-round summary records, by round (a resumed run's repeated rounds: the last one wins)."""
        by = {r["round"]: r for r in self.records if r.get("kind") == "round" and isinstance(r.get("round"), int)}
        return [by[k] for k in sorted(by)]

    def site_records(self, split: str = "val", model: str = "global") -> List[Dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "site" and r.get("split") == split
                and r.get("model", "global") == model]

    def sites(self) -> List[str]:
        names: List[str] = []
        for s in self.config.get("sites") or []:
            if isinstance(s, dict) and s.get("name") and s["name"] not in names:
                names.append(str(s["name"]))
        for r in self.records:
            if r.get("site") and r["site"] not in names:
                names.append(str(r["site"]))
        return names


def load_run(path: Path, require_something: bool = True) -> RunData:
    """Parse a run directory; RunDirError if it is not one (``require_something``) or a file is corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    paths = RunPaths(path)
    if require_something and not any(p.exists() for p in [path / f for f in FILES] + [paths.slurm_jobs]):
        raise RunDirError(f"{path}: not a run directory (none of {', '.join(FILES)}): nothing to report")
    return RunData(
        path=path,
        config=read_yaml(paths.config) or {},
        manifest=read_json(paths.manifest),
        records=read_metrics(paths.metrics_path),
        summary=read_json(paths.summary),
        cross_site=read_json(paths.cross_site),
    )
