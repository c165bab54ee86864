"""The run directory's errors and its one warning line."""
from __future__ import annotations

import sys

from ..errors import HpcflError, LaunchError


class RunDirError(HpcflError):
    """The run directory cannot be created, read or written."""


class RunDirBusy(LaunchError):
    """Another live run holds the run directory."""


def warn(message: str) -> None:
    """One warning line on stderr (rank 0's log handlers are not installed yet when run directories are opened)."""
    sys.stderr.write(f"hpcfl: warning: {message}\n")
    sys.stderr.flush()


__all__ = ["RunDirBusy", "RunDirError", "warn"]
