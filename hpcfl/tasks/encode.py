"""Feature vectors from a trained model: what ``hpcfl features`` runs over every tile of every slide."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError


class Penultimate(nn.Module):
    """The input of a model's last ``nn.Linear`` (in module order), captured by a hook while the whole
    model runs: its feature vector, for any classifier whose head is one linear layer (mlp, cnn, the DINO
    encoder's classifier, most user models)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"task: the model ({type(model).__name__}) has no linear layer whose input could "
                              "serve as features; give the task an encoder() method")
        self.model, self.head = model, linears[-1]
        self.dim = self.head.in_features

    def forward(self, x: Any) -> Any:
        got = []
        handle = self.head.register_forward_hook(lambda mod, inp, out: got.append(inp[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return got[-1].flatten(1)
