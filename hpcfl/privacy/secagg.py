"""Secure aggregation by pairwise masking (Bonawitz et al. 2017), simplified.

Goal: rank 0 learns only the SUM of the site uploads. Each site encodes its
float32 upload as fixed point in Z_{2^64} and adds, for every peer, a mask
derived from a pairwise X25519 secret: ``+m`` towards higher-indexed peers,
``-m`` towards lower ones. Every single upload is uniform over Z_{2^64}; the
masks cancel in the sum, which MPI computes with ``MPI_SUM`` on ``uint64``
(wrapping mod 2^64, exactly as NumPy ``uint64`` addition).

Keys are agreed once per run; the pairwise seed binds (round, min(i,j), max(i,j))
through HKDF, so masks are fresh every round. Masks come from NumPy's Philox
keyed by the seed with the chunk index in the counter, so a 100M-element model
is masked chunk by chunk without ever holding a full mask.

Simplifications against the paper, acceptable for a simulation on one trusted
cluster but not for a deployment:

* Dropout recovery: when site j was in the round's peer set but did not upload,
  the survivors reveal their pairwise seeds with j directly
  (:func:`unmask_dropped_`). The real protocol Shamir-shares each site's key
  among the others and reconstructs the dropped one's, with a second self-mask
  so a late upload cannot be unmasked; neither is implemented.
* No authentication of public keys (an active server could man-in-the-middle).
* Philox is a statistically strong counter-based PRNG, not a cryptographic
  stream cipher; a deployment would expand the seed with AES-CTR or ChaCha20.
"""
from __future__ import annotations

import struct
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, HpcflError, require

DEFAULT_FRAC_BITS = 24
CHUNK = 1 << 20  # elements masked at a time by the *_array_ helpers
_HINT = "pip install 'cryptography>=41'"
_INFO = b"hpcfl-secagg-v1"
_LIMIT = 2.0 ** 62


def _check_frac_bits(frac_bits: int) -> None:
    if not (isinstance(frac_bits, (int, np.integer)) and 0 <= frac_bits <= 52):
        raise ConfigError(f"privacy.secagg.frac_bits must be an integer in [0, 52], got {frac_bits!r}")


# ----------------------------------------------------------------------------- fixed point

def encode(x: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, num_sites: int = 1,
           out: Optional[np.ndarray] = None, chunk: int = CHUNK) -> np.ndarray:
    """``round(x * 2^frac_bits)`` as two's complement ``uint64`` (written into ``out``).

    Raises :class:`HpcflError` if ``max|x| * 2^frac_bits * num_sites`` exceeds
    2^62, i.e. if the sum over ``num_sites`` sites could overflow the signed range.
    """
    _check_frac_bits(frac_bits)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    flat = x.reshape(-1)
    if out is None:
        out = np.empty(flat.size, dtype=np.uint64)
    if out.dtype != np.uint64 or out.size != flat.size:
        raise ValueError(f"out must be a uint64 array of {flat.size} elements")
    if flat.size == 0:
        return out
    peak = max(float(flat.max()), -float(flat.min()))
    if not np.isfinite(peak):
        raise HpcflError("secagg: the upload contains NaN or inf")
    if peak * 2.0 ** frac_bits * num_sites > _LIMIT:
        raise HpcflError(f"secagg: max|x|={peak:.4g} times 2^{frac_bits} times {num_sites} sites exceeds 2^62; "
                         f"lower privacy.secagg.frac_bits")
    scale = np.float64(2.0 ** frac_bits)
    signed = out.reshape(-1).view(np.int64)
    buf = np.empty(min(chunk, flat.size), dtype=np.float64)
    for s in range(0, flat.size, chunk):
        src = flat[s:s + chunk]
        b = buf[:src.size]
        np.multiply(src, scale, out=b)
        np.rint(b, out=b)
        signed[s:s + src.size] = b
    return out


def decode(u: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, out: Optional[np.ndarray] = None,
           dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`encode` (also of a wrapped ``uint64`` sum): ``int64(u) * 2^-frac_bits``."""
    _check_frac_bits(frac_bits)
    if u.dtype != np.uint64:
        raise ValueError(f"decode expects uint64, got {u.dtype}")
    if out is None:
        out = np.empty(u.shape, dtype=dtype)
    np.multiply(u.view(np.int64), 2.0 ** -frac_bits, out=out, casting="same_kind")
    return out


# ----------------------------------------------------------------------------- key agreement

class Keypair:
    """An X25519 key pair; the public half (32 bytes) is what sites exchange once per run."""

    def __init__(self, private_key: Any):
        self.private_key = private_key

    @classmethod
    def generate(cls) -> "Keypair":
        x25519 = require("cryptography.hazmat.primitives.asymmetric.x25519", _HINT)
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> "Keypair":
        x25519 = require("cryptography.hazmat.primitives.asymmetric.x25519", _HINT)
        return cls(x25519.X25519PrivateKey.from_private_bytes(bytes(data)))

    def public_bytes(self) -> bytes:
        ser = require("cryptography.hazmat.primitives.serialization", _HINT)
        return self.private_key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def pair_seed(my_private: Any, peer_public_bytes: bytes, round_: int, i: int, j: int) -> bytes:
    """32-byte seed shared by sites ``i`` and ``j`` for ``round_``: HKDF-SHA256 of their X25519 secret.

    ``my_private`` is a :class:`Keypair` or an ``X25519PrivateKey``. The HKDF
    ``info`` binds (round, min(i,j), max(i,j)), so both ends derive the same seed
    and every round gets a fresh one from keys exchanged once.
    """
    if i == j:
        raise ValueError(f"a site has no pairwise seed with itself (i=j={i})")
    if round_ < 0 or i < 0 or j < 0:
        raise ValueError(f"round and site indices must be >= 0, got round={round_}, i={i}, j={j}")
    x25519 = require("cryptography.hazmat.primitives.asymmetric.x25519", _HINT)
    hashes = require("cryptography.hazmat.primitives.hashes", _HINT)
    hkdf = require("cryptography.hazmat.primitives.kdf.hkdf", _HINT)
    priv = my_private.private_key if isinstance(my_private, Keypair) else my_private
    secret = priv.exchange(x25519.X25519PublicKey.from_public_bytes(bytes(peer_public_bytes)))
    info = _INFO + struct.pack(">QQQ", round_, min(i, j), max(i, j))
    return hkdf.HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


# ----------------------------------------------------------------------------- masks

def mask_chunk(seed: bytes, chunk_index: int, size: int) -> np.ndarray:
    """``size`` uint64 values uniform over Z_{2^64}, determined by (seed, chunk_index).

    Philox key = seed[0:16]; counter = (block, chunk_index, seed[16:24], seed[24:32]).
    The block word counts up from 0 within the chunk, so chunks never overlap.
    """
    if len(seed) != 32:
        raise ValueError(f"seed must be 32 bytes, got {len(seed)}")
    if chunk_index < 0:
        raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
    words = np.frombuffer(seed, dtype="<u8")
    counter = np.array([0, chunk_index, words[2], words[3]], dtype=np.uint64)
    gen = np.random.Philox(key=words[:2].copy(), counter=counter)
    return np.asarray(gen.random_raw(size), dtype=np.uint64)


def mask_(encoded_chunk: np.ndarray, chunk_index: int, my_index: int, peer_seeds: Dict[int, bytes]) -> np.ndarray:
    """Mask one chunk in place: ``+m_ij`` for peers ``j > i``, ``-m_ij`` (mod 2^64) for ``j < i``."""
    if encoded_chunk.dtype != np.uint64:
        raise ValueError(f"mask_ expects uint64, got {encoded_chunk.dtype}")
    for j, seed in peer_seeds.items():
        if j == my_index:
            raise ValueError(f"site {my_index} lists itself among its peers")
        m = mask_chunk(seed, chunk_index, encoded_chunk.size).reshape(encoded_chunk.shape)
        if j > my_index:
            np.add(encoded_chunk, m, out=encoded_chunk)
        else:
            np.subtract(encoded_chunk, m, out=encoded_chunk)
    return encoded_chunk


def unmask_dropped_(sum_chunk: np.ndarray, chunk_index: int,
                    pairs: Iterable[Tuple[int, int, bytes]]) -> np.ndarray:
    """Remove, in place, the masks that did not cancel because a site dropped out.

    ``pairs`` holds ``(i, j, seed)`` for each surviving site ``i`` and dropped
    site ``j`` it had masked against: survivor ``i`` added ``+m`` if ``j > i``
    (so it is subtracted here) and ``-m`` if ``j < i`` (added back).
    """
    if sum_chunk.dtype != np.uint64:
        raise ValueError(f"unmask_dropped_ expects uint64, got {sum_chunk.dtype}")
    for i, j, seed in pairs:
        if i == j:
            raise ValueError(f"pair ({i}, {j}) pairs a site with itself")
        m = mask_chunk(seed, chunk_index, sum_chunk.size).reshape(sum_chunk.shape)
        if j > i:
            np.subtract(sum_chunk, m, out=sum_chunk)
        else:
            np.add(sum_chunk, m, out=sum_chunk)
    return sum_chunk


def iter_chunks(n: int, chunk: int = CHUNK) -> Iterator[Tuple[int, int, int]]:
    """``(chunk_index, start, stop)`` over ``n`` elements; sites and server must use the same ``chunk``."""
    for k, s in enumerate(range(0, n, chunk)):
        yield k, s, min(s + chunk, n)


def mask_array_(encoded: np.ndarray, my_index: int, peer_seeds: Dict[int, bytes], chunk: int = CHUNK) -> np.ndarray:
    """:func:`mask_` over a whole flat ``uint64`` vector, one chunk-sized mask at a time."""
    for k, s, e in iter_chunks(encoded.size, chunk):
        mask_(encoded[s:e], k, my_index, peer_seeds)
    return encoded


def unmask_dropped_array_(summed: np.ndarray, pairs: Sequence[Tuple[int, int, bytes]],
                          chunk: int = CHUNK) -> np.ndarray:
    """:func:`unmask_dropped_` over a whole flat ``uint64`` sum."""
    for k, s, e in iter_chunks(summed.size, chunk):
        unmask_dropped_(summed[s:e], k, pairs)
    return summed
