"""Site training: a data-parallel backend behind a small interface, and the slot that simulates sites.

The round protocol (:mod:`hpcfl.protocol`) drives a :class:`hpcfl.site.slot.SlotWorker`,
which trains its sites one after another with one :class:`hpcfl.site.trainer.SiteTrainer`,
which talks to the other ranks of its slot only through a :class:`SiteBackend`:
Horovod process sets (``site.backend: horovod``) or torch.distributed groups
(``site.backend: torch``, NCCL or Gloo per slot: :mod:`hpcfl.site.layout`).
"""
from typing import Any

__all__ = ["BACKENDS", "SiteBackend", "SoloBackend", "make_backend"]


def __getattr__(name: str) -> Any:
    """The names of :mod:`.backend`, loaded on first use: :mod:`.data` (the data layer) is imported through
    this package without the backends (docs/architecture.md)."""
    if name in __all__:
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
