"""Tasks: what a federation trains (``task:`` in the config). See :mod:`hpcfl.tasks.base`.

* ``classify`` (default): supervised classification, cross-entropy, accuracy/AUC;
* ``dino``: DINO self-supervised pretraining (Caron et al. 2021) with k-NN and linear-probe evaluation;
* ``mil``: gated attention MIL on slide labels over tile features (Ilse et al. 2018), pooled slide AUC;
* ``package.module:Class``: a user's own :class:`Task` subclass.

Importing this package never imports torch (rank 0 summarizes metrics without it).
"""
from __future__ import annotations

from .base import BUILTIN, DataSpec, SiteGroup, StepContext, Task, make_task, matching, task_class

__all__ = ["BUILTIN", "DataSpec", "SiteGroup", "StepContext", "Task", "make_task", "matching", "task_class"]
