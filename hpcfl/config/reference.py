"""The config reference (README.md's table), generated from the schema's field metadata."""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from .convert import to_dict
from ..fields import join
from .schema import Config


def reference(cls: Any = Config, prefix: str = "") -> list:
    """(key path, type, default, help) rows for the documentation's config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference(tp, p))
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if inner:
            rows.extend(reference(inner[0], p + ("[]" if typing.get_origin(tp) in (tuple,) else "")))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")  # type: ignore[misc]
        rows.append((p, _typename(tp), default, f.metadata.get("help", "")))
    return rows


def _typename(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_typename(a) for a in args if a is not type(None)) + " or null"
    if origin is Literal:
        return " \\| ".join(map(str, args))
    if origin in (tuple, typing.Tuple):
        return f"list of {_typename(args[0])}"
    if origin in (dict, typing.Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def reference_markdown() -> str:
    """The config reference table of README.md (a test keeps the two in sync)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in reference():
        d = "required" if default == "required" else f"`{json.dumps(to_dict(default))}`"
        lines.append(f"| `{key}` | {tp} | {d} | {help_} |")
    return "\n".join(lines)
