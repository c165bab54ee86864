"""A user's own task for the tests: regress each sample's mean intensity from the sample (MSE).

It lives outside hpcfl on purpose: `task: tests.regression_task:MeanIntensity` must work for any
importable class, with nothing in the trainer or the protocol knowing it.
"""
from typing import Any, Dict

import numpy as np

from hpcfl.tasks import DataSpec, StepContext, Task


class MeanIntensity(Task):
    name = "mean_intensity"
    metrics = ("mse",)
    minimize = ("mse",)
    headline = ("mse",)
    supervised = False  # the target comes from the input, not the labels

    def build_model(self, spec: DataSpec) -> Any:
        import torch.nn as nn

        width = int(self.cfg.task_args.get("hidden", 16))
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(spec.input_shape)), width), nn.ReLU(),
                             nn.Linear(width, 1))

    def loss(self, module, batch, ctx: StepContext):
        import torch.nn.functional as F

        x, _ = batch
        target = x.flatten(1).mean(1, keepdim=True)
        err = F.mse_loss(module(x), target)
        return err, {"target_mean": target.mean()}

    def eval_size(self, spec: DataSpec) -> int:
        return 2

    def evaluate(self, module, data, ctx: StepContext) -> np.ndarray:
        import torch

        sse, n = 0.0, 0
        with torch.no_grad():
            for x, _ in data.val_batches(256):
                target = x.flatten(1).mean(1, keepdim=True)
                sse += float(((module(x) - target) ** 2).sum())
                n += int(x.shape[0])
        return np.array([sse, n], np.float64)

    def summarize(self, vec: np.ndarray) -> Dict[str, Any]:
        return {"mse": float(vec[0] / vec[1]) if vec[1] else None, "samples": int(vec[1])}
