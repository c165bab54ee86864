"""Privacy for site uploads: what leaves a site, and what the aggregator can learn from it.

* :mod:`.exclude`: partial weight sharing (parameters that never leave the site);
* :mod:`.percentile`: percentile privacy (share only the largest update entries);
* :mod:`.dp`: DP-FedAvg clipping, noise, adaptive clipping and epsilon accounting;
* :mod:`.secagg`: pairwise-masked secure aggregation (rank 0 sees only the sum).

Heavy dependencies (``dp-accounting``, ``cryptography``) are imported lazily.
"""
from __future__ import annotations

from .dp import (Accountant, adaptive_clip_update, clip_, epsilon, gaussian_noise_, l2_norm, noisy_unclipped_fraction,
                 split_noise)
from .exclude import exclude_slices, matched_names, zero_slices
from .percentile import percentile_filter
from .secagg import (Keypair, decode, encode, iter_chunks, mask_, mask_array_, mask_chunk, pair_seed,
                     unmask_dropped_, unmask_dropped_array_)

__all__ = [
    "Accountant", "adaptive_clip_update", "clip_", "epsilon", "gaussian_noise_", "l2_norm",
    "noisy_unclipped_fraction", "split_noise",
    "exclude_slices", "matched_names", "zero_slices",
    "percentile_filter",
    "Keypair", "decode", "encode", "iter_chunks", "mask_", "mask_array_", "mask_chunk", "pair_seed",
    "unmask_dropped_", "unmask_dropped_array_",
]
