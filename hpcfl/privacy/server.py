"""DP-FedAvg at rank 0, as a wrapper around any mean-based strategy (Flower's way: the privacy
mechanism wraps the rule instead of living inside it).

Sites upload clipped updates with weight 1 (so one site's influence is bounded);
the wrapper adds Gaussian noise of std ``z * C`` to their sum, adapts ``C``
toward a quantile of the update norms when asked (Andrew et al. 2021), and
steps the RDP accountant. Everything else is the wrapped strategy's.

:func:`run_strategy` is the one place a run's strategy is built, wrapped or not: rank 0's and the
sites' (which need only its upload weight) come from it.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..aggregation.strategies import Strategy
from . import dp as D


def dp_noise_multiplier(dp) -> float:
    """The noise multiplier applied to the sum of updates (adaptive clipping spends part of z on the count)."""
    if dp.adaptive and dp.noise_multiplier > 0:
        return D.split_noise(dp.noise_multiplier, dp.count_noise_multiplier)
    return dp.noise_multiplier


class DifferentialPrivacy(Strategy):
    """``DifferentialPrivacy(strategy, dp_config, rng, sample_rate)``: DP-FedAvg around ``strategy``."""

    def __init__(self, inner: Strategy, dp: Any, rng: Optional[np.random.Generator] = None,
                 sample_rate: Optional[float] = None):
        """Sites need only ``upload_weight`` (rng and sample_rate None); rank 0 needs all of it."""
        self.inner, self.dp, self.rng = inner, dp, rng
        self.name, self.kind = inner.name, inner.kind
        self.clip = dp.clip_norm
        self.accountant: Optional[D.Accountant] = None
        if dp.noise_multiplier > 0 and sample_rate is not None:
            self.accountant = D.Accountant(dp.noise_multiplier, sample_rate, dp.delta)

    # -- the wrapped rule ------------------------------------------------------------------------------
    def begin_round(self, num_sites: int) -> None:
        self.inner.begin_round(num_sites)

    def finalize(self, delta, weights, round_):
        self.inner.finalize(delta, weights, round_)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def memory_copies(self) -> int:
        return self.inner.memory_copies()

    def has_local_penalty(self) -> bool:
        return self.inner.has_local_penalty()

    def local_penalty(self, params, anchors):
        return self.inner.local_penalty(params, anchors)

    # -- DP ----------------------------------------------------------------------------------------------
    def upload_weight(self, num_train: int) -> float:
        return 1.0  # every site counts once: its influence is bounded by the clip norm

    def upload_clip(self) -> float:
        return self.clip

    def on_sum(self, acc: np.ndarray, back: np.ndarray, rows: Mapping[int, Any]) -> Dict[str, Any]:
        """The sum of clipped updates gets its noise; ``rows`` say which sites' updates were within the clip."""
        unclipped = sum(1 for i in np.flatnonzero(back) if rows[i].unclipped)
        return self.noise_sum_(acc, int(back.sum()), unclipped)

    def noise_sum_(self, acc: np.ndarray, num_sites: int, unclipped: int) -> Dict[str, Any]:
        """Noise on the sum of clipped updates; the next clip norm; the accountant's epsilon."""
        dp = self.dp
        z = dp_noise_multiplier(dp)
        if z > 0:
            D.gaussian_noise_(acc, z * self.clip, self.rng)
        out: Dict[str, Any] = {"dp_clip_norm": self.clip, "dp_noise_multiplier": z, "dp_unclipped": int(unclipped)}
        if dp.adaptive:
            frac = D.noisy_unclipped_fraction(unclipped, num_sites,
                                              dp.count_noise_multiplier if dp.noise_multiplier > 0 else 0.0, self.rng)
            self.clip = D.adaptive_clip_update(self.clip, frac, dp.target_quantile, dp.clip_lr)
        if self.accountant is not None:
            self.accountant.step()
            out["dp_epsilon"] = self.accountant.epsilon()
            out["dp_delta"] = dp.delta
        else:
            out["dp_epsilon"] = float("inf")
        return out

    def get_extra_state(self) -> Dict[str, Any]:
        """The clip norm (adaptive clipping moves it) and the accountant's ledger, for the checkpoint."""
        out: Dict[str, Any] = {**self.inner.get_extra_state(), "clip_norm": self.clip}
        if self.accountant is not None:
            out["accountant"] = self.accountant.state_dict()
        return out

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.inner.set_extra_state(state)
        self.clip = float(state.get("clip_norm", self.dp.clip_norm))
        if self.accountant is not None and "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])


def run_strategy(cfg: Any, k: int, rng: Optional[np.random.Generator] = None) -> Strategy:
    """The strategy of a run of ``k`` sites: ``fl``'s rule, wrapped by DP-FedAvg when ``privacy.dp`` is set.

    Rank 0 passes its random stream: the wrapper then draws the noise and keeps the accountant (sampling
    rate: the sites sampled per round over ``k``). The sites pass none: they need its upload weight only."""
    from .. import aggregation
    from ..participation import sample_size

    strategy = aggregation.strategy_for(cfg.fl)
    if cfg.privacy.dp is None:
        return strategy
    if rng is None:
        return DifferentialPrivacy(strategy, cfg.privacy.dp)
    q = sample_size(cfg.fl.sampling.fraction, cfg.fl.sampling.min_sites, k) / k
    return DifferentialPrivacy(strategy, cfg.privacy.dp, rng, q)
