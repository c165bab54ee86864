"""Progress of long commands (``synth-slides``, ``tile``): a tqdm bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns and escape codes; in a SLURM
output file or a CI log those become garbage. Where the stream is not a
terminal we print a plain line now and then (and at the end) instead.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


def plain_lines(items: Sequence[T], desc: str, unit: str, stream, every_s: float = 10.0,
                clock=time.monotonic) -> Iterator[T]:
    """Yield ``items``; after an item, print ``desc: k/n unit (p%), elapsed, ETA`` if ``every_s`` passed, and at the end."""
    n = len(items)
    t0 = last = clock()
    for k, item in enumerate(items, 1):
        yield item
        now = clock()
        if now - last >= every_s or k == n:
            el = now - t0
            eta = f", ETA {_fmt_s(el / k * (n - k))}" if k < n else ""
            stream.write(f"{desc}: {k}/{n} {unit}s ({100 * k // n}%), {_fmt_s(el)} elapsed{eta}\n")
            stream.flush()
            last = now


def progress_iter(items: Iterable[T], desc: str, unit: str, stream=None, every_s: float = 10.0) -> Iterable[T]:
    """``items`` wrapped for showing progress on ``stream`` (default stderr); see the module docstring."""
    stream = stream if stream is not None else sys.stderr
    items = list(items)
    if is_terminal(stream):
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is a dependency; without it, plain lines
            pass
        else:
            return tqdm(items, desc=desc, unit=unit, file=stream)
    return plain_lines(items, desc, unit, stream, every_s)

