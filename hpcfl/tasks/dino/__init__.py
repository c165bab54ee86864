"""``task: dino``: DINO self-supervised pretraining of a tile encoder, evaluated by k-NN and a linear probe.

Its config section is :mod:`.config` (imported by the schema without the task, so the task is loaded lazily)."""
from typing import Any

__all__ = ["DinoTask"]


def __getattr__(name: str) -> Any:
    if name == "DinoTask":
        from .task import DinoTask

        return DinoTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
