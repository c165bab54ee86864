"""The Task interface: what a federation trains, separated from how it is federated.

A task builds the model, defines one training step's loss, declares which
state travels between sites, and evaluates. The trainer (``hpcfl.site``) runs
the optimizer, gradient averaging inside the site, mixed precision and the
device; the round protocol (``hpcfl.protocol``) moves the exchanged state.
Neither knows anything task-specific.

Life cycle in a site process (one process may simulate several sites in turn)::

    task = make_task(cfg)                      # once per process
    module = task.build_model(spec)            # once; every float tensor becomes part of the flat model
    for every round, for every site this process simulates:
        load the global weights (exchanged entries) and the site's own (local) entries
        task.begin_round(module, ctx)          # ctx: round, steps, device, site group
        repeat planned steps:
            loss, stats = task.loss(module, batch, ctx)   # under autocast when train.precision != fp32
            (trainer: backward, average gradients over the site's ranks, optimizer step)
            task.after_step(module, ctx)       # e.g. DINO: teacher EMA, centre update
        vec = task.evaluate(module, data, ctx) # metric SUMS over this rank's share; summed over the site
    metrics = task.summarize(sum of vectors)   # at rank 0 (plain NumPy: rank 0 never imports torch)
    after the last round: task.end_of_run(module, data, ctx, run_dir)   # e.g. MIL's attention maps
    later, `hpcfl features`: task.encoder(module) maps inputs to feature vectors

Rules a task must follow:
* ``loss`` never reads labels unless the task is supervised (DINO must not: its
  evaluation alone sees labels).
* Collective operations go through ``ctx.group`` (the site's ranks only, never the world).
* All randomness comes from torch's global generator, which the trainer seeds
  from (run seed, round, site, rank) before each site's round: so a round is a
  pure function of the weights it starts from, and resume is exact.
* Anything that must survive rounds lives in the module's float state (a buffer
  or a parameter): entries that are not exchanged are kept per site and
  checkpointed with the run; Python attributes of the task do not survive a
  resume and are shared by all sites of a process.
"""
from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    """What the data looks like, known before the model is built."""

    input_shape: Tuple[int, ...]  # one sample, e.g. (3, 64, 64)
    num_classes: int  # classes of the labels (evaluation only for self-supervised tasks)


class SiteGroup(ABC):
    """Collectives over the ranks that simulate the current site together (a process set)."""

    size: int
    rank: int  # 0 .. size-1; rank 0 is the slot leader

    @abstractmethod
    def allreduce_sum_(self, tensor: Any) -> None:
        """In place: the elementwise sum over the group's ranks."""

    @abstractmethod
    def allgather(self, tensor: Any) -> Any:
        """Concatenate every rank's tensor along dim 0 (first dims may differ), in rank order."""

    @abstractmethod
    def broadcast_(self, tensor: Any, root: int = 0) -> None:
        """In place: every rank gets ``root``'s tensor."""


@dataclass
class StepContext:
    """Where a site is in training. Counters are global so schedules survive a resume."""

    round: int  # 1-based federated round
    rounds: int  # fl.rounds
    step: int  # optimizer step within this round, 0-based
    steps_per_round: int  # planned local steps of this site per round
    steps_per_epoch: int  # optimizer steps of one local epoch of this site
    site: str
    site_index: int
    device: Any  # torch.device
    group: SiteGroup

    @property
    def global_step(self) -> int:
        """Steps this site has taken in earlier rounds plus this one (every round trains ``steps_per_round``)."""
        return (self.round - 1) * self.steps_per_round + self.step

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def epoch(self) -> float:
        """Local epochs completed, counted across rounds (e.g. DINO's teacher temperature warm-up)."""
        return self.global_step / max(1, self.steps_per_epoch)


class Task(ABC):
    """Base class of built-in and user tasks (``task: package.module:Class``)."""

    #: name used in records and the config
    name: str = "task"
    #: scalar metrics :meth:`summarize` returns, each recorded as ``val_<name>`` per round;
    #: ``eval.best_metric`` may name any of them as ``val_<name>``
    metrics: Tuple[str, ...] = ()
    #: metrics where smaller is better (the others: larger is better)
    minimize: Tuple[str, ...] = ("loss",)
    #: metrics printed on the per-round progress line
    headline: Tuple[str, ...] = ()
    #: whether :meth:`loss` uses labels (False: the data loader may skip them)
    supervised: bool = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse settings of this task that per-key bounds cannot catch, at config load (``hpcfl validate``
        and before any rank starts): raise ConfigError naming the key. Must not import torch."""

    # -- data (optional: tasks that read data of their own kind) ------------------------------------
    @classmethod
    def prepare_data(cls, cfg: Any) -> None:
        """At rank 0, before any site rank starts (and once per launch): make or check the data this task
        reads (e.g. synthesize volumes, check datalists), raising an HpcflError naming the file. Must not
        import torch."""

    @classmethod
    def site_data(cls, cfg: Any, topology: Any, role: Any, run_dir: Any, shared: Dict[str, Any],
                  device: Any) -> Any:
        """The :class:`hpcfl.site.data.SiteData` of one site as one rank sees it, or None for the data
        ``data.name`` gives every task (arrays, tiles with their class labels)."""
        return None

    # -- model and exchange -----------------------------------------------------------------------
    @abstractmethod
    def build_model(self, spec: DataSpec) -> Any:
        """A torch module holding ALL float state of the task (e.g. student, teacher and centre).

        Called after torch's generator is seeded identically on every site, so every
        site builds the same initial weights."""

    def exchanged(self) -> Sequence[str]:
        """Regexes (``re.search``) of state names that travel to the aggregator and back.

        Entries that match none are kept by each site across rounds (and resumed).
        ``privacy.exclude_vars`` removes further entries from what is exchanged."""
        return (".*",)

    def trainable(self, module: Any) -> List[Tuple[str, Any]]:
        """(name, parameter) pairs the optimizer updates; default: every parameter with requires_grad."""
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    # -- training -------------------------------------------------------------------------------------
    def begin_round(self, module: Any, ctx: StepContext) -> None:
        """Before a site's local training in a round (module in train mode, weights loaded)."""

    @abstractmethod
    def loss(self, module: Any, batch: Tuple[Any, Any], ctx: StepContext) -> Tuple[Any, Dict[str, Any]]:
        """Forward one batch ``(x, y)`` (tensors on ``ctx.device``); return (scalar loss, stats).

        ``stats``: name -> scalar tensor, the batch MEAN of something worth watching (the
        trainer reports the sample-weighted mean over the round and the site's ranks,
        without a host sync per step). ``loss`` is added to them by the trainer."""

    def after_step(self, module: Any, ctx: StepContext) -> None:
        """After the optimizer step (e.g. EMA of a teacher). Collectives via ``ctx.group`` only."""

    # -- evaluation -----------------------------------------------------------------------------------
    @abstractmethod
    def eval_size(self, spec: DataSpec) -> int:
        """Length of the metric sums vector."""

    @abstractmethod
    def evaluate(self, module: Any, data: Any, ctx: StepContext) -> np.ndarray:
        """Metric SUMS of ``module`` on the site's data (float64, length :meth:`eval_size`).

        Each rank evaluates its share; the trainer sums the vectors over the site's ranks,
        rank 0 sums them over sites, so everything in the vector must add up. ``data``
        offers ``val_batches(bs)`` and ``train_eval_batches(bs)`` (un-augmented training
        samples, e.g. a k-NN bank or a linear probe's training set), each yielding
        ``(x, y)`` on the device, and ``group`` in ``ctx`` for collectives."""

    def evaluate_many(self, module: Any, datas: Sequence[Any], ctx: StepContext) -> List[np.ndarray]:
        """:meth:`evaluate` of ONE model on the data of several sites (a slot's, when their models are
        the same): one vector per site. Override to batch across sites (classify does)."""
        return [self.evaluate(module, d, ctx) for d in datas]

    @abstractmethod
    def summarize(self, vec: np.ndarray) -> Dict[str, Any]:
        """Metrics from a sums vector (of one site, or summed over sites). Pure NumPy: runs on rank 0."""

    # -- after training ---------------------------------------------------------------------------------
    def encoder(self, module: Any) -> Any:
        """A callable mapping a batch of inputs, as the data gives them, to one feature vector per input
        (``hpcfl features``). Default: the model up to its last linear layer (the input of that layer)."""
        from .encode import Penultimate

        return Penultimate(module)

    def end_of_run(self, module: Any, data: Any, ctx: StepContext, run_dir: Any) -> None:
        """Once, after the last round, on every rank of a site, with the final global model (and the
        site's own entries) loaded: write what the task keeps of it (e.g. MIL's attention maps)."""


# -- finding a task -------------------------------------------------------------------------------------

BUILTIN = {"classify": "hpcfl.tasks.classify:ClassifyTask", "dino": "hpcfl.tasks.dino:DinoTask",
           "segment": "hpcfl.tasks.segment:SegmentTask", "mil": "hpcfl.tasks.mil:MilTask"}


def task_class(name: str, key: str = "task") -> type:
    """The Task class named by the config: a built-in name or ``package.module:Class``."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(BUILTIN)} or `package.module:Class`")
    mod_name, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}: cannot import {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"{key}: {name!r} is not a subclass of hpcfl.tasks.Task")
    return cls


def make_task(cfg: Any) -> Task:
    return task_class(cfg.task)(cfg)


def matching(names: Iterable[str], patterns: Sequence[str]) -> List[str]:
    """Names that any regex of ``patterns`` finds (re.search), in the given order."""
    rx = [re.compile(p) for p in patterns]
    return [n for n in names if any(r.search(n) for r in rx)]


__all__ = ["DataSpec", "SiteGroup", "StepContext", "Task", "make_task", "task_class", "matching", "BUILTIN"]
