"""One way to write a file that is never seen half-written.

The content goes to a temporary file next to the target (``.<name>.tmp-<pid>-<thread>``),
is flushed and fsync'ed, then renamed over the target, and the directory is fsync'ed:
a crash or a full disk at any point leaves either the new file or the old one, and no
temporary file behind. Every file hpcfl rewrites in place (checkpoints, best.npz,
config.yaml, metrics.jsonl, summaries, site-private weights) goes through :func:`write_atomic`.
"""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Type, Union

from .errors import HpcflError

Content = Union[bytes, str, Callable[[BinaryIO], None]]

# errno values that mean "no room": the device, the user's quota, or a file size limit (RLIMIT_FSIZE).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteError(HpcflError):
    """A file could not be written (full disk, quota, permissions); the previous version is intact."""


def temp_name(path: Path) -> Path:
    """The temporary file a write of ``path`` goes through (unique per process and thread)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def why_not_written(exc: OSError) -> str:
    """A user's reason for a failed write: a full disk or quota is said so, in words."""
    if exc.errno in NO_ROOM:
        return f"the disk or quota is full ({exc.strerror or exc}); free space and relaunch"
    return str(exc.strerror or exc)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Union[str, Path], content: Content, *, error: Type[HpcflError] = WriteError,
                 what: str = "") -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary file) to ``path`` atomically.

    An OSError (a full disk, a quota, a file size limit, permissions) removes the temporary
    file and raises ``error`` in one line naming the file; ``what`` is appended to it
    (e.g. "the previous checkpoint ... is intact"). Anything else (an interrupt) removes the
    temporary file and propagates.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise error(f"{path}: cannot write: {why_not_written(exc)}{'; ' + what if what else ''}") from None
        raise
    fsync_dir(path.parent)
    return path


__all__ = ["write_atomic", "temp_name", "fsync_dir", "why_not_written", "WriteError", "NO_ROOM"]
