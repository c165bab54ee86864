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

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..aggregation import fedavg
from ..comm import SharedModels, one_node, reduce_sum_array, shm_room
from ..errors import HpcflError
from ..device import chunks
from .kinds import Kind, mean_of_sum, plain_mean, register, total_weight
from .message import Message

log = logging.getLogger("hpcfl")
# Above this many slots the Reduce stays: rank 0 sums the window's segments one after another (S reads of the
# model), where the Reduce's tree spreads the additions over the slots (~log2(S) transfers, ~3 copies each, on
# rank 0's path): about even at 16-32 by that count; not measured above 2 slots (2-core machines).
SHARED_MAX_SLOTS = 16
BLOCK = 1 << 16  # entries per block of a fused pass: 256 KiB of float32, three of them stay in a core's L2 cache


def _blocks(n: int):
    return ((s, min(n, s + BLOCK)) for s in range(0, n, BLOCK))


def _norm_blocks(parts) -> float:
    """L2 norm from ``(start, end, block)`` parts: float32 dots (BLAS) summed in float64; a block whose float32
    dot is not finite is redone in float64, so only a truly non-finite update reads as one."""
    sq = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for _, _, d in parts:
            x = float(np.dot(d, d))
            if not math.isfinite(x):
                x = float(np.dot(d.astype(np.float64), d.astype(np.float64)))
            sq += x
    return math.sqrt(sq)


@dataclass
class Revealed(Message):
    """Slot leader -> rank 0 (secure aggregation): the seeds its surviving sites share with sites that did not
    return, ``(survivor, dropped, seed)``, so rank 0 can remove the masks that did not cancel."""

    pairs: List[Tuple[int, int, bytes]]


@register("mean")
class MeanKind(Kind):
    """Mean rules: each slot leader Reduces the sum of its sites' weighted updates; rank 0 divides by the
    total weight. Built as :class:`SecureMeanKind` under ``privacy.secure_aggregation``."""

    fuses = True

    @classmethod
    def build(cls, cfg: Any, strategy: Any, size: int, topology: Any) -> "Kind":
        sa = cfg.privacy.secure_aggregation
        if sa is not None and cls is MeanKind:
            return SecureMeanKind.build(cfg, strategy, size, topology)
        kind = super().build(cfg, strategy, size, topology)
        kind.shm_wanted = cls is MeanKind and cfg.launch.shared_memory
        return kind

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.acc: Optional[np.ndarray] = None  # slot leader: the sum of its sites' weighted updates
        self._tmp: Optional[np.ndarray] = None  # one block (add_difference, the fused update)
        self._site_tmp: Optional[np.ndarray] = None  # model-sized (add_site)
        self._empty = True
        self.shm_wanted = False
        self.window: Optional[SharedModels] = None  # launch.shared_memory, on one node: the sums travel through it

    # -- both halves ----------------------------------------------------------------------------------
    def share(self, fed: Any, weights: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """After start-up, on rank 0 (``weights``: its global model) and every leader (collective): put the
        sums and the global model in one shared-memory window where the whole federation is on one node
        (:class:`hpcfl.comm.SharedModels`). Returns rank 0's weights, moved into the window (None: not shared)."""
        ok = self.shm_wanted and fed.Get_size() - 1 <= SHARED_MAX_SLOTS and one_node(fed)
        if fed.Get_rank() == 0:
            why = shm_room(self.size * 4 * fed.Get_size()) if ok else None
            if why:
                log.warning("launch.shared_memory: the models go through MPI messages instead (%s)", why)
            ok = fed.bcast(ok and why is None, root=0)
        else:
            ok = fed.bcast(None, root=0)
        if not ok:
            return None
        try:
            self.window = SharedModels(fed, self.size)
        except Exception as exc:  # mpi4py's MPI.Exception: no window on this MPI (every rank fails alike)
            raise HpcflError(f"launch.shared_memory: MPI could not allocate a shared-memory window of "
                             f"{self.size * 4 >> 20} MiB per rank ({exc}); set launch.shared_memory: false") from None
        if weights is None:
            self.acc = self.window.mine
            return None
        self.window.mine[...] = weights
        return self.window.mine

    def close(self) -> None:
        """End of the run, on rank 0 and every leader (collective where shared)."""
        if self.window is not None:
            self.acc = None
            self.window.close()
            self.window = None

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
        if self._site_tmp is None:
            self._site_tmp = np.empty_like(self.acc)
        self.acc += fedavg.contribution(update, weight, out=self._site_tmp)

    def add_difference(self, site: int, local: np.ndarray, global_: np.ndarray, weight: float) -> float:
        """:meth:`add_site` of ``local - global_`` (no filters), in cache-sized blocks: for the slot's first site
        the difference, its norm and its weighting are ONE pass over the model, written once into the sum (the
        same float32 arithmetic as :meth:`add_site`: the same sum). Returns the difference's norm (float32 dot
        per block, summed in float64: within ~1e-6 of :func:`update_norm`'s; a block that overflows float32 is
        redone in float64); one that is not finite is not added. A later site's difference is taken twice, in
        cache: once for its norm (which says whether it counts: the sum must not change before), once to add it
        (two read-only streams cost less than writing it out and reading it back)."""
        w, tmp, acc = np.float32(weight), self._block_tmp(), self.acc
        if not self._empty:
            norm = _norm_blocks(((s, e, np.subtract(local[s:e], global_[s:e], out=tmp[:e - s]))
                                 for s, e in _blocks(self.size)))
            if math.isfinite(norm):
                for s, e in _blocks(self.size):
                    d = np.subtract(local[s:e], global_[s:e], out=tmp[:e - s])
                    d *= w
                    acc[s:e] += d
            return norm

        def diffs():
            for s, e in _blocks(self.size):
                d = np.subtract(local[s:e], global_[s:e], out=tmp[:e - s])
                yield s, e, d
                np.multiply(d, w, out=acc[s:e])

        norm = _norm_blocks(diffs())
        self._empty = not math.isfinite(norm)  # a non-finite first site leaves no trace: the next one overwrites
        return norm

    def _block_tmp(self) -> np.ndarray:
        if self._tmp is None or self._tmp.size != BLOCK:
            self._tmp = np.empty(BLOCK, np.float32)
        return self._tmp

    def upload(self, fed: Any, back: np.ndarray, mine: Sequence[int] = ()) -> None:
        if self._empty:
            self.acc.fill(0.0)
        if self.window is not None:
            self.window.publish()  # rank 0 sums the window's segments (receive_sum)
            return
        reduce_sum_array(fed, self.acc, None, chunk_mb=self.chunk_mb)

    # -- rank 0 half ----------------------------------------------------------------------------------
    def receive_sum(self, fed: Any, acc: np.ndarray) -> None:
        """The sum of every slot's accumulator, into ``acc`` (rank 0's one model-sized buffer). Shared: in slot
        order, ((s1 + s2) + s3) + ... (for 2 slots the Reduce's bits; for more, a fixed order where Open MPI's
        depends on its algorithm)."""
        if self.window is not None:
            self.window.publish()
            segs = self.window.segs[1:]
            if len(segs) == 1:
                np.copyto(acc, segs[0])
                return
            np.add(segs[0], segs[1], out=acc)
            for seg in segs[2:]:
                acc += seg
            return
        acc.fill(0.0)
        reduce_sum_array(fed, None, acc, chunk_mb=self.chunk_mb)

    def aggregate(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
                  rows: Dict[int, Any]) -> Dict[str, Any]:
        self.receive_sum(fed, acc)
        return mean_of_sum(strategy, acc, back, back, num_train, rows)

    def update(self, fed: Any, strategy: Any, back: np.ndarray, num_train: np.ndarray, acc: np.ndarray,
               weights: np.ndarray, r: int, rows: Dict[int, Any]) -> Dict[str, Any]:
        """A plain mean (:func:`plain_mean`): sum, division and ``weights +=`` in ONE blocked pass (the same
        float32 operations per entry as :meth:`aggregate` then ``finalize``: the same weights); through shared
        memory the slots' segments are summed there, in slot order (:meth:`receive_sum`)."""
        if not plain_mean(strategy) or type(self) is not MeanKind:
            return super().update(fed, strategy, back, num_train, acc, weights, r, rows)
        total = total_weight(strategy, back, num_train)
        if total <= 0:
            raise ValueError("no samples were aggregated (every site reported 0)")
        if self.window is None:
            self.receive_sum(fed, acc)
            parts = [acc]
        else:
            self.window.publish()
            parts = self.window.segs[1:]
        t, tmp = np.float32(total), self._block_tmp()
        for s, e in _blocks(self.size):
            x = tmp[:e - s]
            if len(parts) == 1:
                np.copyto(x, parts[0][s:e])
            else:
                np.add(parts[0][s:e], parts[1][s:e], out=x)
                for p in parts[2:]:
                    x += p[s:e]
            x /= t
            weights[s:e] += x
        return {}


class SecureMeanKind(MeanKind):
    """The same sum as masked fixed-point integers (``privacy.secure_aggregation``); the sites' keys are
    set up once per launch (:class:`hpcfl.protocol.startup.KeysExchange`)."""

    fuses = False  # its add_site masks integers

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
