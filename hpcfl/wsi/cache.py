"""cuCIM's tile cache, configured so that it really takes effect.

In the PyPI wheels, ``CuImage.cache(...)`` from Python has no effect, while a
config file does. So we write the configured cache to a JSON file and point
``CUCIM_CONFIG_PATH`` at it in every process before cuCIM reads its config
(the first ``CuImage``). Tests prove the cache by its effect: after a read, the
slide file is overwritten, and a repeated read still returns the same pixels.

``shared_memory``: cuCIM names the segment after the process that creates it,
so it is shared between a rank and its (forked) DataLoader workers, not across
separate MPI ranks; each rank of a site has its own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

CACHE_TYPES = ("nocache", "per_process", "shared_memory")


def cache_config(cache_type: str, capacity_mb: int) -> dict:
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache type must be one of {CACHE_TYPES}, got {cache_type!r}")
    return {"cache": {"type": cache_type, "memory_capacity": int(capacity_mb), "record_stat": False}}


def configure_cache(cache_type: str, capacity_mb: int, directory: Path) -> Optional[Path]:
    """Write the cache config into ``directory`` and make this process (and its children) use it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f".cucim-{cache_type}-{capacity_mb}.json"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache_config(cache_type, capacity_mb)))
        os.replace(tmp, path)
    os.environ["CUCIM_CONFIG_PATH"] = str(path.resolve())
    return path
