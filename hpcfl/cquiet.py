"""C libraries must not write to the user's terminal: what they print on fd 2 while hpcfl calls them is caught.

libtiff (inside cuCIM and OpenSlide) prints its own complaint on the process's stderr ("Not a TIFF or MDI
file, bad magic number ...", "Cannot read TIFF header.") before hpcfl's one line about the same file. The
call runs with fd 2 pointing at a temporary file; what the library wrote becomes part of hpcfl's message
(or the rank's log when the call succeeded) instead of a stray line on the terminal.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from typing import Iterator, List

_LOCK = threading.Lock()  # fd 2 is the process's: one capture at a time, or two would restore each other's file
log = logging.getLogger("hpcfl")


def _new_lock() -> None:
    """In a forked child (a DataLoader worker): a lock held by another thread of the parent is never released."""
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


@contextlib.contextmanager
def c_stderr(what: str) -> Iterator[List[str]]:
    """Capture fd 2 around a C call; the list it yields holds, afterwards, the non-empty lines it wrote.

    On success those lines go to hpcfl's log (``what`` names the call); on failure the caller adds
    :func:`said` of them to its error."""
    with _LOCK:
        got: List[str] = []
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 at all: nothing to protect
            yield got
            return
        tmp = tempfile.TemporaryFile()
        ok = False
        try:
            os.dup2(tmp.fileno(), 2)
            yield got
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            got.extend(ln.strip() for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip())
            tmp.close()
            if ok and got:
                log.info("%s printed: %s", what, " | ".join(got), extra={"console": False})


def said(lines: List[str], limit: int = 200) -> str:
    """`` (libtiff said: ...)`` of captured lines, for an error message; '' if none."""
    if not lines:
        return ""
    text = " | ".join(dict.fromkeys(lines))
    return f" (the library said: {text if len(text) <= limit else text[:limit - 3] + '...'})"


__all__ = ["c_stderr", "said"]
