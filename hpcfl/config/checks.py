"""Cross-field checks: combinations that per-key bounds cannot catch, refused before any rank starts.

A built-in task's own checks live beside its section (``check`` in hpcfl/tasks/dino/config.py, ...) and are
registered in :data:`TASK_CHECKS`; a user's task (``package.module:Class``) is imported and checked when the
ranks start.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional

from ..errors import ConfigError
from ..tasks.dino.config import check as _check_dino
from ..tasks.mil_config import check as _check_mil
from ..tasks.segment.config import check as _check_segment
from ..fields import suggest
from .. import sitelist
from ..sitelist import UniformSites
from .schema import Config

# The built-in tasks (hpcfl.tasks.base.BUILTIN names their classes; a unit test keeps the two equal) and the
# check each one's section adds.
TASK_CHECKS: Dict[str, Optional[Callable[[Any], None]]] = {
    "classify": None, "dino": lambda cfg: _check_dino(cfg.dino), "segment": _check_segment, "mil": _check_mil}


_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate(cfg: Config, src: str) -> None:
    if not cfg.sites:
        raise ConfigError(f"{src}: sites: at least one site is required")
    seen = set()
    for i, s in enumerate(() if isinstance(cfg.sites, UniformSites) else cfg.sites):  # the shorthand's are valid
        if not _SITE_NAME.match(s.name):
            raise ConfigError(f"{src}: sites[{i}].name: {s.name!r} must be letters, digits, '-', '_' or '.'")
        if s.name in seen:
            raise ConfigError(f"{src}: sites[{i}].name: duplicate site name {s.name!r}")
        seen.add(s.name)
        if s.overrides.local_epochs is not None and s.overrides.local_steps is not None:
            raise ConfigError(f"{src}: sites[{i}].overrides: set local_epochs or local_steps, not both")
    if cfg.fl.local_epochs is not None and cfg.fl.local_steps is not None:
        raise ConfigError(f"{src}: fl: set local_epochs or local_steps, not both")
    if cfg.run.name and not _SITE_NAME.match(cfg.run.name):
        raise ConfigError(f"{src}: run.name: {cfg.run.name!r} must be letters, digits, '-', '_' or '.'")
    _validate_fl(cfg, src)
    _validate_gpu_sharing(cfg, src)
    if cfg.data.tiles.partition == "labels" and not cfg.data.tiles.labels:
        raise ConfigError(f"{src}: data.tiles.labels: partition: labels needs a slide labels CSV with a site column")
    if cfg.task not in TASK_CHECKS and ":" not in cfg.task:
        raise ConfigError(f"{src}: task: {cfg.task!r} is not {', '.join(TASK_CHECKS)} or `package.module:Class`"
                          f"{suggest(cfg.task, list(TASK_CHECKS))}")
    check = TASK_CHECKS.get(cfg.task)  # a user's task is imported (and checked) when the ranks start
    if check is not None:
        try:
            check(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None
    rank_counts = len(sitelist.rank_counts(cfg.sites))
    if cfg.launch.slots and not rank_counts <= cfg.launch.slots <= len(cfg.sites):
        raise ConfigError(f"{src}: launch.slots: {cfg.launch.slots} slots cannot simulate {len(cfg.sites)} sites with "
                          f"{rank_counts} different rank count(s); choose between {rank_counts} and {len(cfg.sites)} "
                          "(0 = automatic)")
    _validate_assign(cfg, src)
    if cfg.eval.central_fraction > 0 and (cfg.task != "classify" or cfg.data.name not in ("digits", "synthetic", "arrays")):
        raise ConfigError(f"{src}: eval.central_fraction: a central held-out set is cut from data.name digits, synthetic "
                          f"or arrays for task classify (this config: task {cfg.task}, data.name {cfg.data.name})")
    inj = cfg.debug.inject_failure
    if inj is not None and inj.rank >= cfg.world_size:
        raise ConfigError(f"{src}: debug.inject_failure.rank: {inj.rank} is not a rank of this {cfg.world_size}-rank federation")
    if inj is not None and inj.round > cfg.fl.rounds:
        raise ConfigError(f"{src}: debug.inject_failure.round: {inj.round} is after the last round ({cfg.fl.rounds})")
    hold = cfg.debug.hold
    if hold is not None and hold.round > cfg.fl.rounds:
        raise ConfigError(f"{src}: debug.hold.round: {hold.round} is after the last round ({cfg.fl.rounds})")


ROBUST = ("median", "trimmed_mean", "krum")


def _validate_gpu_sharing(cfg: Config, src: str) -> None:
    """Horovod averages GPU gradients with NCCL, which refuses two ranks of one process set on one GPU; the
    torch backend picks Gloo for such slots (hpcfl.site.layout), Horovod cannot."""
    c = cfg.cluster
    if cfg.site.backend != "horovod" or c.ranks_per_gpu <= 1 or cfg.train.device == "cpu" or c.gpus_per_node == 0:
        return
    if any(s.ranks > 1 for s in cfg.sites):
        raise ConfigError(f"{src}: cluster.ranks_per_gpu: {c.ranks_per_gpu} puts ranks of one site on one GPU, and "
                          "Horovod's NCCL refuses two ranks of a process set on one GPU; use site.backend: torch "
                          "(Gloo for such sites), ranks_per_gpu: 1, or train.device: cpu")


def _validate_assign(cfg: Config, src: str) -> None:
    """launch.assign: balanced moves sites between slots, so nothing may be tied to a slot."""
    if cfg.launch.assign != "balanced":
        return
    if len(sitelist.rank_counts(cfg.sites)) > 1:
        raise ConfigError(f"{src}: launch.assign: balanced deals sites to any slot, so every site needs the same "
                          "number of ranks")
    if cfg.fl.strategy in ROBUST:
        raise ConfigError(f"{src}: launch.assign: balanced works with mean-based strategies; {cfg.fl.strategy} "
                          "gathers each site's update in a fixed slot layout (use launch.assign: static)")
    if cfg.privacy.exclude_vars:
        raise ConfigError(f"{src}: launch.assign: balanced cannot keep privacy.exclude_vars entries per site "
                          "(they stay in the slot that holds them); use launch.assign: static")


def _validate_fl(cfg: Config, src: str) -> None:
    """Combinations that cannot work, refused before any rank starts."""
    fl, pv, k = cfg.fl, cfg.privacy, len(cfg.sites)
    if fl.min_sites > k:
        raise ConfigError(f"{src}: fl.min_sites: {fl.min_sites} is more than the {k} sites")
    if fl.sampling.min_sites > k:
        raise ConfigError(f"{src}: fl.sampling.min_sites: {fl.sampling.min_sites} is more than the {k} sites")
    if fl.strategy in ROBUST:
        if pv.secure_aggregation is not None:
            raise ConfigError(f"{src}: privacy.secure_aggregation: {fl.strategy} needs each site's update, which "
                              "secure aggregation hides from rank 0; use a mean-based strategy")
        if pv.dp is not None:
            raise ConfigError(f"{src}: privacy.dp: DP-FedAvg's noise calibration assumes a sum of clipped updates; "
                              f"it is not defined for {fl.strategy}")
    if fl.strategy == "krum":
        f = fl.robust.byzantine
        if k < 2 * f + 3:
            raise ConfigError(f"{src}: fl.robust.byzantine: Krum with f={f} needs at least {2 * f + 3} sites, "
                              f"the federation has {k}")
        if fl.robust.krum_keep > k - f:
            raise ConfigError(f"{src}: fl.robust.krum_keep: {fl.robust.krum_keep} is more than sites - byzantine "
                              f"({k - f})")
    if fl.strategy == "trimmed_mean" and 2 * int(fl.robust.trim_fraction * k) >= k:
        raise ConfigError(f"{src}: fl.robust.trim_fraction: trimming {int(fl.robust.trim_fraction * k)} of {k} "
                          "sites at each end leaves none")
    if pv.dp is not None and pv.dp.adaptive and pv.dp.noise_multiplier > 0 \
            and pv.dp.count_noise_multiplier <= pv.dp.noise_multiplier / 2:
        raise ConfigError(f"{src}: privacy.dp.count_noise_multiplier: must be > noise_multiplier / 2 "
                          f"({pv.dp.noise_multiplier / 2}) for adaptive clipping to leave budget for the updates")
    for i, pat in enumerate(pv.exclude_vars):
        try:
            re.compile(pat)
        except re.error as exc:
            raise ConfigError(f"{src}: privacy.exclude_vars[{i}]: {pat!r} is not a regular expression: {exc}") from None
