"""Aggregation rules: pure functions over arrays and sample weights.

The round loop talks to a :class:`Strategy`; how bytes move (MPI Reduce) is the
transport's business, the math lives here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict

import numpy as np

from . import fedavg as _fedavg


class Strategy(ABC):
    """A reducible aggregation rule.

    Sites call :meth:`contribution` on their trained weights; the transport sums
    contributions; the aggregator calls :meth:`finalize` on the sum. Stateful
    rules keep their state in :meth:`state_dict` (name -> NumPy array), which is
    checkpointed.
    """

    name = "base"

    @abstractmethod
    def contribution(self, weights: np.ndarray, num_samples: float, out: np.ndarray) -> np.ndarray:
        """A site's upload for this rule, written into ``out``."""

    @abstractmethod
    def finalize(self, summed: np.ndarray, total_samples: float, global_weights: np.ndarray) -> None:
        """Write the new global model into ``global_weights`` (which holds the previous one)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state, got {sorted(state)}")


class FedAvg(Strategy):
    name = "fedavg"

    def contribution(self, weights, num_samples, out):
        return _fedavg.contribution(weights, num_samples, out=out)

    def finalize(self, summed, total_samples, global_weights):
        _fedavg.finalize(summed, total_samples, out=global_weights)


def make_strategy(name: str) -> Strategy:
    rules = {"fedavg": FedAvg}
    return rules[name]()


__all__ = ["Strategy", "FedAvg", "make_strategy"]
