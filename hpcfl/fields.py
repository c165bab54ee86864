"""How a config key is declared (:func:`setting`), shared by the schema and by the sections that live
next to their owners (hpcfl/wsi/config.py, hpcfl/tasks/*/config.py), and the "did you mean" of every error.

Field metadata: "min"/"max" are inclusive bounds, "gt" exclusive, "help" is the one-line description
printed in the README's config reference.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import field
from typing import Any, Sequence


def setting(default: Any = dataclasses.MISSING, *, help: str, **checks: Any) -> Any:
    """A dataclass field with its help line and bounds (the checks in metadata)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: d, metadata=meta)
    return field(default=default, metadata=meta)


def suggest(word: str, options: Sequence[str]) -> str:
    """" (did you mean 'x'?)" for the closest option, or "" when none is close."""
    opts = list(options)
    close = difflib.get_close_matches(word, opts, n=1, cutoff=0.6) or \
        [o for o in opts if len(o) > 1 and (word.startswith(o) or o.startswith(word))][:1] or \
        difflib.get_close_matches(word, opts, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


__all__ = ["join", "setting", "suggest"]
