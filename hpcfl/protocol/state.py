"""Rank 0's state by protocol: every part that a resume needs declares it with ``state_dict()`` /
``load_state_dict()`` (torch.distributed.checkpoint's Stateful, Horovod elastic's State), and a
checkpoint is assembled from those parts (:func:`assemble`) and taken apart into them (:func:`restore`).

Rank 0's parts, and where each lives in the file (:mod:`hpcfl.checkpoint`'s layout, unchanged):

* ``model``: the global model (:class:`GlobalModel`) -> ``model/<name>`` arrays;
* ``strategy``: the rule's buffers (server optimizers' moments) -> ``strategy/<key>`` arrays;
* ``extra``: what a strategy or its privacy wrapper keeps besides arrays (DP: clip norm, accountant;
  ``Strategy.get_extra_state``, torch.nn.Module's name for it) -> ``meta.state``;
* ``best``: the best global model so far (:class:`BestModel`) -> ``meta.state.best``;
* ``rng``: rank 0's random stream as the next round starts from it (:class:`ServerRng`) -> ``meta.rng``.

The slots' one piece of state across rounds is each site's private entries
(:class:`hpcfl.site.slot.PrivateEntries`, one file per site); their random streams are
seeded per round, so they have none.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

import numpy as np

from ..model import Entry, layout_signature, state_views


class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class GlobalModel:
    """Rank 0's global model: a flat float32 array, its layout, and the one model-sized scratch buffer
    (the aggregate) rank 0 needs besides it."""

    def __init__(self, entries: List[Entry], weights: np.ndarray):
        self.entries, self.weights = entries, weights
        self.signature = layout_signature(entries)
        self.acc = np.zeros_like(weights)
        self.window: Any = None  # hpcfl.comm.SharedModels when the weights live in it (launch.shared_memory)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Views by name, not copies: serialise them before the next aggregation changes the weights."""
        return state_views(self.weights, self.entries)

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        for name, view in state_views(self.weights, self.entries).items():
            view[...] = state[name]


class ServerRng:
    """Rank 0's randomness (plans, DP noise) and the state a resume restarts it from: taken by
    :meth:`mark` before the next round's plan is drawn."""

    def __init__(self, seed: int):
        self.gen = np.random.default_rng([seed, 29])
        self.saved = self.gen.bit_generator.state

    def mark(self) -> None:
        self.saved = self.gen.bit_generator.state

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.saved}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "rng" in state:
            self.gen.bit_generator.state = self.saved = state["rng"]


class BestModel:
    """The best global model by ``eval.best_metric`` (``best.npz``), and its record in the checkpoint."""

    def __init__(self, key: str, minimize: bool):
        self.key, self.minimize = key, minimize
        self.best: Optional[Dict[str, Any]] = None  # {"metric", "value", "round"}

    def better(self, r: int, summary: Dict[str, Any]) -> bool:
        """Whether round ``r``'s summary beats the best so far (then it becomes the best); notes the best in it."""
        value = summary.get(self.key)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return False
        b = self.best
        won = b is None or (value < b["value"] if self.minimize else value > b["value"])
        if won:
            self.best = {"metric": self.key, "value": float(value), "round": r}
        summary["best"] = dict(self.best)
        return won

    def state_dict(self) -> Dict[str, Any]:
        return {"best": dict(self.best) if self.best else self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")


class ExtraState:
    """A strategy's non-array state (``get_extra_state``/``set_extra_state``) as a part of its own."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def state_dict(self) -> Dict[str, Any]:
        return self.strategy.get_extra_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.set_extra_state(state)


# part -> where it lives in the file: ("arrays", npz prefix) or ("meta", key) or ("meta.state", None: merged)
PLACES: Dict[str, Tuple[str, Optional[str]]] = {
    "model": ("arrays", "model"), "strategy": ("arrays", "strategy"),
    "extra": ("meta.state", None), "best": ("meta.state", None), "rng": ("meta", None)}


def assemble(parts: Mapping[str, Stateful]) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, Any]]:
    """({npz prefix: arrays}, meta) of a checkpoint from its parts' state dicts."""
    arrays: Dict[str, Dict[str, np.ndarray]] = {}
    meta: Dict[str, Any] = {"state": {}}
    for name, part in parts.items():
        where, key = PLACES[name]
        state = part.state_dict()
        if where == "arrays":
            arrays[key] = state
        elif where == "meta.state":
            meta["state"].update(state)
        else:
            meta.update(state)
    return arrays, meta


def restore(parts: Mapping[str, Stateful], ckpt: Mapping[str, Any], on_error: Callable[[str, Exception], None]) -> None:
    """Load every part from a loaded checkpoint (``hpcfl.checkpoint.load_checkpoint``'s dict); a part that
    refuses its state (ValueError) goes to ``on_error(part, exc)``."""
    meta_state = ckpt.get("state", {})
    for name, part in parts.items():
        where, key = PLACES[name]
        state = ckpt.get(key, {}) if where == "arrays" else meta_state if where == "meta.state" else ckpt
        try:
            part.load_state_dict(state)
        except ValueError as exc:
            on_error(name, exc)


__all__ = ["Stateful", "GlobalModel", "ServerRng", "BestModel", "ExtraState", "PLACES", "assemble", "restore"]
