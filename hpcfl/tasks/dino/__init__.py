"""``task: dino``: DINO self-supervised pretraining of a tile encoder, evaluated by k-NN and a linear probe."""
from .task import DinoTask

__all__ = ["DinoTask"]
