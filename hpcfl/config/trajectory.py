"""The resume hash: what in a config determines the training trajectory, so a run resumes only under a config
that would have trained the same completed rounds."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

from .convert import to_dict
from ..sitelist import UniformSites
from .schema import Config


# Keys that may change between a run and its resumption without changing what
# the completed rounds mean: more rounds, where the run lives, how it is launched.
_HASH_EXCLUDED = {("fl", "rounds"), ("run", "name"), ("run", "root"), ("launch",), ("debug",), ("checkpoint",), ("eval",),
                  ("cluster",), ("observe",), ("fault",), ("pipeline",)}


def trajectory_dict(cfg: Any) -> dict:
    """The part of a config (object or plain dict) that determines the training trajectory."""
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else copy.deepcopy(cfg)
    for key in _HASH_EXCLUDED:
        node = d
        for k in key[:-1]:
            node = node.get(k, {})
        node.pop(key[-1], None)
    return d


def config_hash(cfg: Config) -> str:
    """Hash of everything that determines the training trajectory (not rounds, paths or launch).

    The shorthand `sites: {count}` is hashed as the list it stands for, one site at a time: the hash of a
    run started before the shorthand stayed lazy is unchanged (its checkpoints resume), and 10,000 sites
    are never held at once."""
    d = trajectory_dict(cfg)
    sites = getattr(cfg, "sites", None)
    if not isinstance(sites, UniformSites):
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    d["sites"] = mark = "\0sites\0"
    head, tail = json.dumps(d, sort_keys=True, separators=(",", ":")).split(json.dumps(mark), 1)
    h = hashlib.sha256(head.encode() + b"[")
    for i, s in enumerate(sites):
        h.update((b"," if i else b"") + json.dumps(to_dict(s), sort_keys=True, separators=(",", ":")).encode())
    h.update(b"]" + tail.encode())
    return h.hexdigest()[:16]
