"""``task: segment``: MONAI segmentation of WSI tiles (with their masks) or 3D NIfTI volumes, scored by Dice."""
from .task import SegmentTask

__all__ = ["SegmentTask"]
