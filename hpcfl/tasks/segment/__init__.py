"""``task: segment``: MONAI segmentation of WSI tiles (with their masks) or 3D NIfTI volumes, scored by Dice.

Its config section is :mod:`.config` (imported by the schema without the task, so the task is loaded lazily)."""
from typing import Any

__all__ = ["SegmentTask"]


def __getattr__(name: str) -> Any:
    if name == "SegmentTask":
        from .task import SegmentTask

        return SegmentTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
