"""Conversion between plain data and the typed config: a YAML dict to frozen dataclasses (types, bounds, unknown
keys with a "did you mean", the ``sites: {count, ranks}`` shorthand) and back (:func:`to_dict`, :func:`dump_yaml`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Dict, Literal, Mapping, Optional, Sequence

import yaml

from ..errors import ConfigError
from ..fields import join, suggest
from ..sitelist import UniformSites
from .schema import Config, SiteConfig, SiteOverrides


def _convert(tp: Any, value: Any, path: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        if dataclasses.is_dataclass(inner[0]) and isinstance(value, bool):  # `dp: true` = the defaults, false = off
            return build(inner[0], {}, path, src) if value else None
        return _convert(inner[0], value, path, src)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{src}: {path}: {value!r} is not one of {', '.join(map(str, args))}{suggest(str(value), [str(a) for a in args])}"
            )
        return value
    if origin in (tuple, typing.Tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value] if not isinstance(value, Mapping) else value
            if isinstance(value, Mapping):
                raise ConfigError(f"{src}: {path}: expected a list, got a mapping")
        return tuple(_convert(args[0], v, f"{path}[{i}]", src) for i, v in enumerate(value))
    if origin in (dict, typing.Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{src}: {path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{src}: {path}: must be a finite integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{src}: {path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {path}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{src}: {path}: {value} is too large for a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{src}: {path}: must be a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {path}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a schema bug, not a user error


def _range_problem(meta: Mapping[str, Any], value: Any) -> str:
    """What is wrong with a number against a field's bounds ('' when nothing)."""
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
        return f"must be a finite number, got {value!r}"
    if "min" in meta and value < meta["min"]:
        return f"must be >= {meta['min']}, got {value}"
    if "max" in meta and value > meta["max"]:
        return f"must be <= {meta['max']}, got {value}"
    if "gt" in meta and not value > meta["gt"]:
        return f"must be > {meta['gt']}, got {value}"
    return ""


def _check_range(meta: Mapping[str, Any], value: Any, path: str, src: str) -> None:
    problem = _range_problem(meta, value)
    if problem:
        raise ConfigError(f"{src}: {path}: {problem}")


def check_arg(label: str, value: Any, key: str) -> None:
    """A command-line value checked against the range of the config key it mirrors (e.g. "data.tiles.tile_size")."""
    cls: Any = Config
    *parents, name = key.split(".")
    for part in parents:
        tp = typing.get_type_hints(cls)[part]
        cls = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), tp)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    problem = _range_problem(meta, value)
    if problem:
        raise ConfigError(f"{label}: {problem} (as the config key {key})")


MAX_SITES = 100_000  # `sites: {count: 1e9}` would otherwise build a billion dicts


def expand_sites(raw: Any, path: str, src: str) -> Any:
    """`sites: {count: N, ranks: R}` is shorthand for N sites named site1..siteN."""
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"count", "ranks"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{src}: {join(path, key)}: unknown key{suggest(key, ['count', 'ranks'])}; "
                              "sites is a list of {name, ranks, overrides} or the shorthand {count, ranks}")
        count = _convert(int, raw.get("count", 1), join(path, "count"), src)
        ranks = _convert(int, raw.get("ranks", 1), join(path, "ranks"), src)
        _check_range({"min": 1, "max": MAX_SITES}, count, join(path, "count"), src)
        return [{"name": f"site{i + 1}", "ranks": ranks} for i in range(count)]
    return raw


def _lazy_sites(raw: Any, path: str, src: str) -> Any:
    """The shorthand as a count (hpcfl.sitelist.UniformSites): 10,000 sites cost rank 0 no per-site objects."""
    if not isinstance(raw, Mapping):
        return None
    expand_sites({**raw, "count": 1}, path, src)  # unknown keys, as the list form says them
    count = _convert(int, raw.get("count", 1), join(path, "count"), src)
    _check_range({"min": 1, "max": MAX_SITES}, count, join(path, "count"), src)
    ranks = _convert(int, raw.get("ranks", 1), join(path, "ranks"), src)
    _check_range({f.name: f.metadata for f in dataclasses.fields(SiteConfig)}["ranks"], ranks, join(path, "ranks"), src)
    return UniformSites(count, ranks)


@functools.lru_cache(maxsize=None)
def _hints(cls: Any) -> Dict[str, Any]:
    """A dataclass's resolved field types, once per class: `sites: {count: 10000}` builds 10,000 SiteConfigs,
    and resolving their string annotations each time took 2 s."""
    return typing.get_type_hints(cls)


def build(cls: Any, raw: Any, path: str, src: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: {path or '<top level>'}: expected a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{src}: {join(path, key)}: unknown key{suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        p = join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{src}: {p}: required key is missing")
            continue
        value = raw[name]
        lazy = _lazy_sites(value, p, src) if cls is Config and name == "sites" else None
        if lazy is not None:
            kwargs[name] = lazy
            continue
        value = _convert(hints[name], value, p, src)
        _check_range(f.metadata, value, p, src)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-Python form of a config (tuples become lists), for YAML/JSON output."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, UniformSites):
        return cfg.as_dict()  # the shorthand stays one: config.yaml, the broadcast config, MLflow params
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Config) -> str:
    d = to_dict(cfg)
    short = _sites_shorthand(cfg.sites)
    if short is not None:
        d["sites"] = short
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)


def _sites_shorthand(sites: Sequence[SiteConfig]) -> Optional[Dict[str, int]]:
    """``{count, ranks}`` for a long list of sites that the shorthand would give back exactly (a run's
    config.yaml for 10,000 sites was 1.4 MB, and PyYAML took minutes to read it back for the report)."""
    if isinstance(sites, UniformSites):
        return sites.as_dict() if len(sites) > 256 else None
    if len(sites) <= 256 or len({s.ranks for s in sites}) != 1:
        return None
    plain = SiteOverrides()
    if any(s.name != f"site{i + 1}" or s.overrides != plain or s.dropout != 0.0 or s.speed != 1.0
           for i, s in enumerate(sites)):
        return None
    return {"count": len(sites), "ranks": sites[0].ranks}
