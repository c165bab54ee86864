"""Partial weight sharing (Clara/NVFlare ``exclude_vars``): some parameters never leave the site.

Patterns are regular expressions matched with :func:`re.search` against entry
names of the flat model. A pattern that matches nothing is an error, not a
no-op: a typo would otherwise silently share the weights it was meant to keep.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..model import Entry

KEY = "privacy.exclude_vars"


def _compile(patterns: Iterable[str]) -> List[Tuple[str, "re.Pattern[str]"]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{KEY}: pattern {p!r} is not a string")
        try:
            compiled.append((p, re.compile(p)))
        except re.error as exc:
            raise ConfigError(f"{KEY}: pattern {p!r} is not a valid regular expression ({exc})") from exc
    return compiled


def matched_names(entries: Sequence[Entry], patterns: Iterable[str]) -> List[str]:
    """Names of the entries that any pattern matches, in model order.

    Raises :class:`ConfigError` for an invalid regex or a pattern that matches no entry.
    """
    compiled = _compile(patterns)
    for p, rx in compiled:
        if not any(rx.search(e.name) for e in entries):
            names = [e.name for e in entries]
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            raise ConfigError(f"{KEY}: pattern {p!r} matches no model entry (entries: {shown or 'none'})")
    return [e.name for e in entries if any(rx.search(e.name) for _, rx in compiled)]


def exclude_slices(entries: Sequence[Entry], patterns: Iterable[str]) -> List[Tuple[int, int]]:
    """``(start, stop)`` ranges of the flat vector that must not be shared, adjacent ranges merged."""
    names = set(matched_names(entries, patterns))
    slices: List[Tuple[int, int]] = []
    for e in sorted((e for e in entries if e.name in names), key=lambda e: e.offset):
        start, stop = e.offset, e.offset + e.numel
        if slices and slices[-1][1] == start:
            slices[-1] = (slices[-1][0], stop)
        else:
            slices.append((start, stop))
    return slices


def zero_slices(arr: np.ndarray, slices: Iterable[Tuple[int, int]]) -> np.ndarray:
    """Set ``arr[start:stop] = 0`` for every slice, in place; returns ``arr``."""
    for start, stop in slices:
        arr[start:stop] = 0
    return arr
