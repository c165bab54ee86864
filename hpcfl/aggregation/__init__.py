"""Aggregation rules: pure functions over arrays (fedavg, fedopt, robust) and the
:class:`Strategy` objects the round loop drives (strategies).

A Strategy declares its ``kind``; how bytes move (MPI Reduce for mean-based
rules, chunked Gather for coordinate-wise and selecting rules) is that kind's
business (:mod:`hpcfl.protocol.kinds`), the rule's math lives here. docs/algorithms.md lists them.
"""
from __future__ import annotations

from typing import Any

from .strategies import (STRATEGIES, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Krum, Median,
                         Strategy, TrimmedMean, make_strategy)


def strategy_for(fl: Any) -> Strategy:
    """The Strategy of a config's ``fl`` section."""
    s, r = fl.server, fl.robust
    lr = s.lr if s.lr is not None else (1.0 if fl.strategy == "fedavgm" else 1e-2)
    params = {"server_lr": lr, "server_momentum": s.momentum, "beta2": s.beta2, "tau": s.tau,
              "trim_fraction": r.trim_fraction, "byzantine": r.byzantine, "krum_keep": r.krum_keep,
              "proximal_mu": fl.proximal_mu}
    if s.beta1 is not None:
        params["beta1"] = s.beta1
    return make_strategy(fl.strategy, params)


__all__ = ["Strategy", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Median", "TrimmedMean", "Krum",
           "STRATEGIES", "make_strategy", "strategy_for"]
