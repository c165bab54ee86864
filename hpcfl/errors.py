"""One exception hierarchy for everything a user can get wrong or that can fail.

The CLI catches :class:`HpcflError` and prints ``hpcfl: <message>`` on one line;
anything else is a bug and gets a traceback.
"""
from __future__ import annotations


class HpcflError(Exception):
    """Base class: a problem the user can act on, reported in one line."""


class ConfigError(HpcflError):
    """A config file or ``--set`` override is invalid; the message names file and key."""


class TopologyError(HpcflError):
    """The world size or launcher does not match the sites the config declares."""


class CheckpointError(HpcflError):
    """A checkpoint is missing, unreadable or belongs to another config."""


class LaunchError(HpcflError):
    """The launcher could not be built or started, or the job it ran failed."""


class DependencyError(HpcflError):
    """An optional heavy dependency is missing; the message says what to install."""


class DataError(HpcflError):
    """Input data is missing or inconsistent (a datalist entry, a mask, a label value); the message names the file."""


class RankFailure(HpcflError):
    """A rank of a running federation failed; raised on purpose to end the job."""


def require(module: str, install_hint: str):
    """Import ``module`` lazily, turning ImportError into a DependencyError that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(f"{module} is not importable ({exc}); install it with: {install_hint}") from exc
