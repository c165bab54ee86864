"""The one message type of the round protocol: a dataclass with named, typed fields.

Everything rank 0 and the slots tell each other is a :class:`Message` subclass (Flower's
Message/RecordDict and NVFlare's Shareable are the models): the round's plan, which sites'
updates count, which sites Krum kept, the start-up reports, the per-site rows. The model
itself is a payload (a flat float32 array), not a message.

A message travels one of two ways, decided by its fields:

* **packed**: every field a number (``bool``, ``int``, ``float``) or a per-site vector
  (:func:`per_site`: one value per site of the federation). Such a message is ONE small
  float64 buffer, so the receiver can post an MPI ``Bcast`` into a buffer it allocates
  itself. The layout is generated here from the declared field list, in declaration order
  (:meth:`Message.pack`, :meth:`Message.unpack`); no code anywhere numbers positions.
  An ``optional`` per-site field is in the buffer only when both sides say so (e.g. the
  slot of each site under ``launch.assign: balanced``).
* **pickled**: any other message (rows with dicts, sparse vectors), through ``gather``/``bcast``.

Adding a field is one line in the message's class; both sides see it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

import numpy as np

M = TypeVar("M", bound="Message")
_SCALARS = {bool: bool, int: int, float: float, "bool": bool, "int": int, "float": float}


def per_site(dtype: type = float, optional: bool = False) -> Any:
    """A field holding one value per site (length K), of ``dtype`` (bool, int or float); ``optional``: only in
    the buffer when the sender and receiver both ask for it (:meth:`Message.empty`)."""
    return dataclasses.field(default=None, metadata={"per_site": dtype, "optional": optional})


def _size(spec: List[Tuple[str, type, int, Optional[int]]]) -> int:
    return max((start + 1 if stop is None else stop for _, _, start, stop in spec), default=0)


@dataclasses.dataclass
class Message:
    """Base of every message between rank 0 and the slots (see the module docstring)."""

    @classmethod
    def layout(cls, k: int, optional: Tuple[str, ...] = ()) -> List[Tuple[str, type, int, Optional[int]]]:
        """``(field, type, start, stop)`` of each field in the packed buffer; ``stop`` None: a scalar.

        ``optional``: the names of the optional per-site fields that travel."""
        out: List[Tuple[str, type, int, Optional[int]]] = []
        pos = 0
        for f in dataclasses.fields(cls):
            dtype = f.metadata.get("per_site")
            if dtype is not None:
                if f.metadata.get("optional") and f.name not in optional:
                    continue
                out.append((f.name, dtype, pos, pos + k))
                pos += k
                continue
            kind = _SCALARS.get(f.type)
            if kind is None:
                raise TypeError(f"{cls.__name__}.{f.name}: a packed message holds bool, int, float or per_site "
                                f"fields, not {f.type!r} (send it pickled)")
            out.append((f.name, kind, pos, None))
            pos += 1
        return out

    def _present(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self)
                     if f.metadata.get("optional") and getattr(self, f.name) is not None)

    def pack(self, k: int) -> np.ndarray:
        """This message as one float64 buffer (:meth:`layout`)."""
        spec = self.layout(k, self._present())
        buf = np.zeros(_size(spec), np.float64)
        for name, _, start, stop in spec:
            value = getattr(self, name)
            if stop is None:
                buf[start] = float(value)
            elif value is not None:
                buf[start:stop] = value
        return buf

    @classmethod
    def empty(cls, k: int, optional: Tuple[str, ...] = ()) -> np.ndarray:
        """A zeroed buffer to receive a packed message into."""
        return np.zeros(_size(cls.layout(k, optional)), np.float64)

    @classmethod
    def unpack(cls: Type[M], buf: np.ndarray, k: int, optional: Tuple[str, ...] = ()) -> M:
        """The message a buffer of :meth:`pack` holds (per-site fields as int64, bool or float64 arrays)."""
        values: Dict[str, Any] = {}
        for name, kind, start, stop in cls.layout(k, optional):
            if stop is None:
                values[name] = kind(buf[start])
            else:
                values[name] = buf[start:stop].astype(np.int64 if kind is int else kind)
        return cls(**values)

    @classmethod
    def bcast(cls: Type[M], comms: Tuple[Optional[Any], ...], k: int, msg: Optional[M] = None,
              optional: Tuple[str, ...] = ()) -> M:
        """Send ``msg`` (rank 0) or receive one, along ``comms`` in turn (each from its rank 0; None or a
        single-rank communicator is skipped)."""
        buf = msg.pack(k) if msg is not None else cls.empty(k, optional)
        for comm in comms:
            if comm is not None and comm.Get_size() > 1:
                comm.Bcast(buf, root=0)
        return msg if msg is not None else cls.unpack(buf, k, optional)


__all__ = ["Message", "per_site"]
