"""Mean-based rules (FedAvg/FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad): a Reduce of weighted updates.

Each slot leader adds its sites' weighted updates ``w_s * d_s`` into one
accumulator (:func:`hpcfl.aggregation.fedavg.contribution`) and sends ONE Reduce
per round, whatever the number of sites it simulates; rank 0 reduces into its
one accumulator and divides by the total weight (:func:`fedavg.finalize`). No
per-site data ever reaches rank 0 and its memory is flat in the number of sites.

With secure aggregation the same sum travels as masked fixed-point integers
(mod 2^64): each site masks its own encoding with the pairwise masks it shares
with every other sampled site, the slot adds its sites' masked integers, and
rank 0 learns only the sum; survivors reveal the seeds they share with sites
that did not return, so rank 0 can remove masks that did not cancel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..aggregation import fedavg
from ..comm import reduce_sum_array
from ..device import chunks
from .kinds import Kind, mean_of_sum, register
from .message import Message


@dataclass
class Revealed(Message):
    """Slot leader -> rank 0 (secure aggregation): the seeds its surviving sites share with sites that did not
    return, ``(survivor, dropped, seed)``, so rank 0 can remove the masks that did not cancel."""

    pairs: List[Tuple[int, int, bytes]]


@register("mean")
class MeanKind(Kind):
    """Mean rules: each slot leader Reduces the sum of its sites' weighted updates; rank 0 divides by the
    total weight. Built as :class:`SecureMeanKind` under ``privacy.secure_aggregation``."""

    @classmethod
    def build(cls, cfg: Any, strategy: Any, size: int, topology: Any) -> "Kind":
        sa = cfg.privacy.secure_aggregation
        if sa is not None and cls is MeanKind:
            return SecureMeanKind.build(cfg, strategy, size, topology)
        return super().build(cfg, strategy, size, topology)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.acc: Optional[np.ndarray] = None  # slot leader: the sum of its sites' weighted updates
        self._tmp: Optional[np.ndarray] = None
        self._empty = True

    # -- slot half ------------------------------------------------------------------------------------
    def begin_round(self, ctl: Any, r: int) -> None:
        if self.acc is None:
            self.acc = np.zeros(self.size, np.float32)
        self._empty = True

    def add_site(self, site: int, update: np.ndarray, weight: float) -> None:
        if self._empty:  # the first site: its contribution IS the sum (no rounding from adding to zeros)
            fedavg.contribution(update, weight, out=self.acc)
            self._empty = False
            return
        if self._tmp is None:
            self._tmp = np.empty_like(self.acc)
        self.acc += fedavg.contribution(update, weight, out=self._tmp)

    def upload(self, fed: Any, back: np.ndarray, mine: Sequence[int] = ()) -> None:
        if self._empty:
            self.acc.fill(0.0)
        reduce_sum_array(fed, self.acc, None, chunk_mb=self.chunk_mb)

    # -- rank 0 half ----------------------------------------------------------------------------------
    def receive_sum(self, fed: Any, acc: np.ndarray) -> None:
        """The sum of every slot's accumulator, into ``acc`` (rank 0's one model-sized buffer)."""
        acc.fill(0.0)
        reduce_sum_array(fed, None, acc, chunk_mb=self.chunk_mb)

    def aggregate(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
                  rows: Dict[int, Any]) -> Dict[str, Any]:
        self.receive_sum(fed, acc)
        return mean_of_sum(strategy, acc, back, back, num_train, rows)


class SecureMeanKind(MeanKind):
    """The same sum as masked fixed-point integers (``privacy.secure_aggregation``); the sites' keys are
    set up once per launch (:class:`hpcfl.protocol.startup.KeysExchange`)."""

    @classmethod
    def build(cls, cfg: Any, strategy: Any, size: int, topology: Any) -> "Kind":
        kind = super().build(cfg, strategy, size, topology)
        kind.bits = cfg.privacy.secure_aggregation.frac_bits
        return kind

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.bits = 0  # fractional bits, set by build
        self.ctl: Any = None  # the round's plan (hpcfl.protocol.control.Control)
        self.round = 0
        self.keys: Dict[int, Any] = {}  # site -> Keypair (its secret never leaves this process)
        self.public: List[bytes] = []
        self.enc: Optional[np.ndarray] = None
        self.pairs: Dict[int, Dict[int, bytes]] = {}
        self.salt: Optional[bytes] = None

    def _steps(self) -> List[Tuple[int, int]]:
        return list(chunks(self.size, 8, self.chunk_mb))

    # -- key set-up (once per launch: :class:`hpcfl.protocol.startup.KeysExchange`) ----------------------
    def own_keys(self, sites: List[int], salt: Optional[bytes] = None) -> Dict[int, Any]:
        """Key pairs of ``sites``: fresh, or (``salt``: balanced slots, where any slot may train any site)
        derived from a secret all slot ranks share and rank 0 does not have."""
        from ..privacy.secagg import Keypair

        self.salt = salt
        self.keys = {s: self.key(s) if salt is not None else Keypair.generate() for s in sites}
        return self.keys

    # -- slot half ------------------------------------------------------------------------------------
    def begin_round(self, ctl: Any, r: int) -> None:
        if self.enc is None:
            self.enc = np.zeros(self.size, np.uint64)
        self.enc.fill(0)
        self.ctl, self.round = ctl, r
        self.pairs = {}

    def add_site(self, site: int, update: np.ndarray, weight: float) -> None:
        from ..privacy import secagg

        masked, back = self.ctl.masked(), self.ctl.returns()
        peers = {j: secagg.pair_seed(self.key(site).private_key, self.public[j], self.round, site, j)
                 for j in np.flatnonzero(masked) if j != site}
        self.pairs[site] = peers
        n_sites = max(1, int(back.sum()))
        for ci, (s, e) in enumerate(self._steps()):
            x = update[s:e] * np.float32(weight) if weight != 1.0 else update[s:e]
            enc = secagg.encode(x, self.bits, num_sites=n_sites)
            secagg.mask_(enc, ci, site, peers)
            np.add(self.enc[s:e], enc, out=self.enc[s:e])

    def upload(self, fed: Any, back: np.ndarray, mine: Sequence[int] = ()) -> None:
        from mpi4py import MPI

        # A survivor reveals the seeds it shares with sites that did not return (SecAgg's recovery step).
        fed.gather(Revealed([(i, j, seed) for i, peers in self.pairs.items() if back[i]
                             for j, seed in peers.items() if not back[j]]), root=0)
        for s, e in self._steps():
            fed.Reduce(self.enc[s:e], None, op=MPI.SUM, root=0)

    def key(self, site: int) -> Any:
        from ..privacy.secagg import Keypair

        got = self.keys.get(site)
        if got is not None:
            return got
        if self.salt is None:
            raise KeyError(f"site {site}: no key pair in this slot (static slots hold their own sites' keys)")
        import hashlib

        return Keypair.from_private_bytes(hashlib.sha256(self.salt + int(site).to_bytes(8, "little")).digest())

    def masked_first_chunk(self, site: int, update: np.ndarray, weight: float) -> np.ndarray:
        """Debug: the masked encoding of chunk 0 of ``site``'s update, as :meth:`add_site` masked it."""
        from ..privacy import secagg

        s, e = self._steps()[0]
        x = update[s:e] * np.float32(weight) if weight != 1.0 else update[s:e]
        enc = secagg.encode(x, self.bits, num_sites=max(1, int(self.ctl.returns().sum())))
        secagg.mask_(enc, 0, site, self.pairs.get(site, {}))
        return enc

    def masked_upload(self) -> np.ndarray:
        """What rank 0 receives from this slot (for the test that uploads look random)."""
        return self.enc

    # -- rank 0 half ----------------------------------------------------------------------------------
    def receive_sum(self, fed: Any, acc: np.ndarray) -> None:
        from mpi4py import MPI

        from ..privacy import secagg

        pairs = [p for got in fed.gather(None, root=0)[1:] for p in got.pairs]
        for ci, (s, e) in enumerate(self._steps()):
            buf = np.zeros(e - s, np.uint64)
            fed.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
            if pairs:
                secagg.unmask_dropped_(buf, ci, pairs)
            secagg.decode(buf, self.bits, out=acc[s:e])
