"""``--set key.path=value`` overrides on a raw config dict, and the migration of keys that moved."""
from __future__ import annotations

import re
from typing import Any, Mapping

from ..errors import ConfigError
from .convert import expand_sites
from .loader import parse_yaml


_INDEX = re.compile(r"^[0-9]{1,9}$")  # a list index in a --set key path (str.isdigit accepts '²')

# An override of one of these replaces the other, which the file may have set.
_EXCLUSIVE = {"local_steps": "local_epochs", "local_epochs": "local_steps"}


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` (value parsed as YAML) to a raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key.path=value")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {assignment}: empty key path")
    value = parse_yaml(text, source=f"--set {key}") if text.strip() else ""
    node: Any = raw
    if len(parts) > 1 and parts[0] == "sites" and _INDEX.match(parts[1]) and isinstance(raw.get("sites"), Mapping):
        raw["sites"] = expand_sites(raw["sites"], "sites", f"--set {key}")  # {count, ranks} -> a list to index
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not _INDEX.match(part) or int(part) >= len(node):
                raise ConfigError(f"--set {assignment}: {where}: index out of range (list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                if part in _EXCLUSIVE and value is not None:
                    node.pop(_EXCLUSIVE[part], None)
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {assignment}: {where}: cannot set a key inside a scalar")


# Keys that moved: (old path) -> (new path). Configs (and run directories' config.yaml) written
# before the move still load, so an older run can be resumed.
_MOVED = {("train", "backend"): ("site", "backend")}


def migrate(raw: dict) -> None:
    for old, new in _MOVED.items():
        node = raw.get(old[0])
        if isinstance(node, dict) and old[1] in node:
            value = node.pop(old[1])
            target = raw.setdefault(new[0], {})
            if isinstance(target, dict):
                target.setdefault(new[1], value)
