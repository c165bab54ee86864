"""The metrics log, ``metrics.jsonl``: rank 0 appends one line per record; a resumed run keeps the completed
rounds' lines only (a round cut by a crash is trained again)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ..atomic import write_atomic
from .errors import RunDirError


class MetricsLog:
    """``metrics.jsonl`` of one run, opened for appending on the first record."""

    def __init__(self, path: Path):
        self.metrics_path = Path(path)
        self._metrics_file = None

    def trim(self, ckpt: Optional[Dict[str, Any]]) -> None:
        """Keep metrics of completed rounds only; restore the last round's from its checkpoint."""
        done = int(ckpt["round"]) if ckpt else 0
        kept: List[str] = []
        rounds_seen = set()
        try:
            lines = self.metrics_path.read_bytes().decode(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            raise RunDirError(f"{self.metrics_path}: cannot read: {exc.strerror or exc}") from None
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash, or damaged
            if not isinstance(rec, dict) or not isinstance(rec.get("round", 0), int):
                continue
            if rec.get("round", 0) <= done:
                kept.append(line)
                rounds_seen.add(rec.get("round"))
        if ckpt and done not in rounds_seen:
            kept.extend(json.dumps(r) for r in ckpt.get("records", []))
        write_atomic(self.metrics_path, "".join(k + "\n" for k in kept), error=RunDirError)

    def append(self, records: Iterable[Dict[str, Any]]) -> None:
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a")
        self._metrics_file.write("".join(json.dumps(r) + "\n" for r in records))
        self._metrics_file.flush()

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


__all__ = ["MetricsLog"]
