"""One place merges defaults < file < command-line overrides: raw dict -> migrated -> overridden -> typed ->
checked (:func:`from_dict`, :func:`load_config`)."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from .checks import validate
from .convert import build
from .loader import parse_yaml, read_config_text
from .overrides import apply_override, migrate
from .schema import Config


def from_dict(raw: Any, source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    migrate(raw)
    for o in overrides:
        apply_override(raw, o)
    cfg = build(Config, raw, "", source)
    validate(cfg, source)
    if not cfg.run.name and source not in ("<dict>", "<string>"):
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=Path(source).stem))
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="run"))
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, override and validate a YAML config; raises ConfigError naming file and key."""
    p = Path(path)
    return from_dict(parse_yaml(read_config_text(p), str(p)), str(p), overrides)
