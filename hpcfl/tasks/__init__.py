"""Tasks: what a federation trains (``task:`` in the config). See :mod:`hpcfl.tasks.base`.

* ``classify`` (default): supervised classification, cross-entropy, accuracy/AUC;
* ``dino``: DINO self-supervised pretraining (Caron et al. 2021) with k-NN and linear-probe evaluation;
* ``mil``: gated attention MIL on slide labels over tile features (Ilse et al. 2018), pooled slide AUC;
* ``package.module:Class``: a user's own :class:`Task` subclass.

Importing this package never imports torch (rank 0 summarizes metrics without it).
"""
from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN", "DataSpec", "SiteGroup", "StepContext", "Task", "make_task", "matching", "task_class"]


def __getattr__(name: str) -> Any:
    """The names of :mod:`.base`, loaded on first use: the config schema imports the tasks' sections
    (hpcfl/tasks/*/config.py) through this package, and must not load the tasks themselves."""
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
