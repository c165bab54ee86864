"""Who takes part in a round: client sampling, simulated dropout and stragglers.

Pure and seeded: rank 0 draws the plan of every round from its own generator
(checkpointed with the model), before the round starts, and broadcasts it.
So the federation is reproducible, resumes exactly, and sites that will not
return do not spend time training; their absence is recorded with a reason.

Simulated time, not wall time, decides who is a straggler: a site needs
``steps * step_time_s / speed`` simulated seconds for a round, and misses a
deadline of ``deadline_s``. Measured wall times on a shared test machine
would make the participants (and so the weights) differ from run to run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from .errors import RankFailure
from .sitelist import UniformSites, names_of

# Per-site codes of a plan (float-safe small integers: they travel in a float64 control vector).
NOT_SAMPLED, RETURNS, DROPOUT, STRAGGLER, DISCARDED, NONFINITE = 0, 1, 2, 3, 4, 5
REASONS = {NOT_SAMPLED: "not_sampled", DROPOUT: "dropout", STRAGGLER: "straggler", DISCARDED: "too_few_returned",
           NONFINITE: "nonfinite_update"}


@dataclass
class Plan:
    codes: np.ndarray  # (K,) int: one code per site
    retries: int = 0
    aggregate: bool = True  # False: fewer than min_sites returned and on_too_few is "skip"
    sim_time_s: float = 0.0

    @property
    def returns(self) -> np.ndarray:
        return self.codes == RETURNS

    @property
    def masked(self) -> np.ndarray:
        """Sites sampled into the round (secure aggregation sets up masks between these)."""
        return np.isin(self.codes, (RETURNS, DROPOUT, STRAGGLER))

    def dropped(self, names: Sequence[str]) -> Dict[str, str]:
        return {names[i]: REASONS[int(c)] for i, c in enumerate(self.codes) if c != RETURNS}


def sample_size(fraction: float, min_sites: int, num_sites: int) -> int:
    """Sites sampled per round: floor(fraction * K), at least min_sites (as Flower's strategies do)."""
    return int(min(num_sites, max(min_sites, int(fraction * num_sites))))


def sim_times(steps: Sequence[int], speeds: Sequence[float], step_time_s: float) -> np.ndarray:
    return np.asarray(steps, float) * step_time_s / np.asarray(speeds, float)


def draw(rng: np.random.Generator, fl, sites, steps: Sequence[int]) -> Plan:
    """One draw: sample, then dropout, then the deadline. Always consumes the same amount of randomness."""
    k = len(sites)
    m = sample_size(fl.sampling.fraction, fl.sampling.min_sites, k)
    chosen = np.sort(rng.choice(k, size=m, replace=False))
    u = rng.random(k)  # one uniform per site, sampled or not: the stream does not depend on who was sampled
    codes = np.full(k, NOT_SAMPLED, dtype=np.int64)
    codes[chosen] = RETURNS
    lazy = isinstance(sites, UniformSites)  # every site speed 1, dropout 0: no per-site objects each round
    times = sim_times(steps, np.ones(k) if lazy else [s.speed for s in sites], fl.stragglers.step_time_s)
    for i in chosen:
        if not lazy and u[i] < sites[i].dropout:
            codes[i] = DROPOUT
        elif fl.stragglers.deadline_s is not None and times[i] > fl.stragglers.deadline_s:
            codes[i] = STRAGGLER
    back = codes == RETURNS
    t = float(times[back].max()) if back.any() else 0.0
    if fl.stragglers.deadline_s is not None and (codes == STRAGGLER).any():
        t = float(fl.stragglers.deadline_s)  # the server waited until the deadline
    return Plan(codes=codes, sim_time_s=t)


def plan_round(rng: np.random.Generator, fl, sites, steps: Sequence[int], round_: int) -> Plan:
    """The participants of a round, applying ``fl.min_sites`` / ``fl.on_too_few``."""
    for attempt in range(fl.max_retries + 1):
        plan = draw(rng, fl, sites, steps)
        plan.retries = attempt
        n = int(plan.returns.sum())
        if n >= fl.min_sites:
            return plan
        if fl.on_too_few == "skip":
            plan.codes[plan.codes == RETURNS] = DISCARDED
            plan.aggregate = False
            return plan
        if fl.on_too_few == "fail":
            break
    names = names_of(sites)
    gone = np.flatnonzero((plan.codes != RETURNS) & (plan.codes != NOT_SAMPLED))  # the 9,950 unsampled: unnamed
    why = ", ".join(f"{names[i]}: {REASONS[int(plan.codes[i])]}" for i in gone)
    raise RankFailure(f"round {round_}: only {n} of {len(sites)} sites returned, fewer than fl.min_sites = "
                      f"{fl.min_sites}" + (f" after {fl.max_retries} retries" if fl.on_too_few == "retry" else "")
                      + f" ({why})")


# -- who is evaluated: bounded, whatever the number of sites ------------------------------------------

def eval_sites(ev, seed: int, k: int, round_: int, rounds: int) -> np.ndarray:
    """Sites whose validation data the global model of ``round_`` is evaluated on (sorted indices).

    Every ``ev.sites_every`` rounds and in the last: every site up to ``ev.sites_max`` sites, above it a
    seeded sample of that many, drawn afresh each round (every rank draws the same: a pure function).
    """
    if round_ % ev.sites_every and round_ != rounds:
        return np.zeros(0, np.int64)
    if k <= ev.sites_max:
        return np.arange(k)
    return np.sort(np.random.default_rng([seed, 53, round_]).choice(k, ev.sites_max, replace=False))


def cross_site_sites(ev, seed: int, k: int) -> np.ndarray:
    """Sites of cross-site validation (K x K): all up to ``ev.cross_site_max``, else a seeded sample of that many."""
    if k <= ev.cross_site_max:
        return np.arange(k)
    return np.sort(np.random.default_rng([seed, 59]).choice(k, ev.cross_site_max, replace=False))
