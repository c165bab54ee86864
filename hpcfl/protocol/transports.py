"""Which transport a strategy's kind needs (the one place that decides)."""
from __future__ import annotations

from typing import Any


def make_transport(cfg, strategy, size: int, topology) -> Any:
    """Mean rules: a Reduce (masked integers with secure aggregation); coordinate-wise and selection
    rules: a chunked Gatherv of per-site updates."""
    from .gathered import CoordinateTransport, SelectTransport
    from .mean import MeanTransport, SecureMeanTransport

    chunk = cfg.launch.chunk_mb
    k = len(topology.sites)
    slot_sites = [s.sites for s in topology.slots]
    if strategy.kind == "coordinate":
        return CoordinateTransport(size, chunk, k, slot_sites)
    if strategy.kind == "select":
        return SelectTransport(size, chunk, k, slot_sites)
    sa = cfg.privacy.secure_aggregation
    if sa is not None:
        return SecureMeanTransport(size, chunk, sa.frac_bits)
    return MeanTransport(size, chunk)
