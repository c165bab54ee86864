#!/usr/bin/env python
"""Local training throughput, CPU next to GPU in one run: samples/s of hpcfl's own training step.

Models: the quickstart CNN (3 strided conv blocks on 64x64 tiles) and a
ResNet-18-sized network (11.7M parameters, the torchvision layout written out
here so no torchvision is needed) on 3x64x64 inputs; precisions fp32 and bf16
(and fp16 with loss scaling on the GPU). Each is trained through
hpcfl.site.trainer.SiteTrainer (flat parameters, flat optimizer, autocast) on
random batches already in device memory, so this measures compute, not data
loading (bench/gpu_tiles.py measures the data path).

Comparable rows: CPU and GPU at the SAME batch size (32), with the GPU-sized batch
(256) as extra GPU rows; on the GPU each row with ``train.channels_last`` off and on
(it converts the input batches only: the weights are NCHW views of the flat buffer,
so on is not assumed to be faster, it is measured).

    python bench/gpu_train.py --json out.json            # CPU and (where present) GPU
    python bench/gpu_train.py --quick                    # a few steps: the CPU-side check
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List


def resnet18(num_classes: int = 4) -> Any:
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.relu(self.b1(self.c1(x)))
            return self.relu(self.b2(self.c2(y)) + self.short(x))

    layers: List[Any] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def throughput(model_name: str, device: str, precision: str, batch: int, steps: int,
               channels_last: bool = False) -> Dict[str, Any]:
    import torch

    from hpcfl.config import from_dict
    from hpcfl.site import SoloBackend
    from hpcfl.site.trainer import SiteTrainer
    from hpcfl.tasks import DataSpec
    from hpcfl.tasks.classify import ClassifyTask

    cfg = from_dict({"sites": [{"name": "a"}], "data": {"name": "tiles"},
                     "model": {"name": "cnn" if model_name == "cnn" else f"{__name__}:_resnet_factory"},
                     "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "precision": precision,
                               "channels_last": channels_last, "device": device}})
    spec = DataSpec((3, 64, 64), 4)
    dev = torch.device(device)
    tr = SiteTrainer(cfg, ClassifyTask(cfg), spec, SoloBackend(), dev)
    x = torch.randn(batch, 3, 64, 64, device=dev)
    y = torch.randint(0, 4, (batch,), device=dev)

    class Data:
        num_train, num_classes, input_shape = batch * steps, 4, (3, 64, 64)

        def steps_per_epoch(self, bs):
            return steps

        def epoch_batches(self, round_, epoch, bs):
            for _ in range(steps):
                yield x, y

    from hpcfl.site.trainer import SiteSettings

    class Site:
        name, index = "a", 0

    settings = SiteSettings(lr=0.01, batch_size=batch, epochs=None, steps=steps)
    tr.train_round(Site, 1, 1, SiteSettings(lr=0.01, batch_size=batch, epochs=None, steps=2), Data())  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    st = tr.train_round(Site, 1, 2, settings, Data())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    params = sum(p.numel() for p in tr.model.module.parameters())
    return {"model": model_name, "device": device, "precision": precision, "batch": batch, "steps": st.steps,
            "channels_last": channels_last,
            "params": int(params), "samples_per_s": batch * st.steps / dt, "seconds": dt,
            "final_loss": float(st.loss_sum / max(st.samples, 1))}


def _resnet_factory(num_features: int, num_classes: int, **_: Any) -> Any:
    return resnet18(num_classes)


MATCHED_BATCH, GPU_BATCH = 32, 256


def configurations(gpu: bool) -> List[tuple]:
    """(device, precision, batch, channels_last) rows: the CPU at the matched batch; the GPU at the matched
    batch and at its own, each with channels_last off and on."""
    rows = [("cpu", p, MATCHED_BATCH, False) for p in ("fp32", "bf16")]
    if gpu:
        rows += [("cuda", p, b, cl) for b in (MATCHED_BATCH, GPU_BATCH) for p in ("fp32", "bf16", "fp16")
                 for cl in (False, True)]
    return rows


def add_ratios(runs: List[Dict[str, Any]]) -> None:
    """``vs_cpu_fp32``: samples/s over the CPU's fp32 row of the same model at the SAME batch size (None where
    the CPU did not run that batch: the GPU-sized rows compare with each other, not with the CPU)."""
    for r in runs:
        base = next((b for b in runs if b["model"] == r["model"] and b["device"] == "cpu" and b["precision"] == "fp32"
                     and b["batch"] == r["batch"]), None)
        r["vs_cpu_fp32"] = r["samples_per_s"] / base["samples_per_s"] if base else None


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="2 steps per configuration")
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    runs = []
    for model in ("cnn", "resnet18"):
        for device, precision, batch, cl in configurations(gpu):
            steps = 2 if a.quick else (30 if device == "cuda" else (20 if model == "cnn" else 3))
            r = throughput(model, device, precision, batch, steps, channels_last=cl)
            runs.append(r)
            print(f"{model:>9} {device:>4} {precision:>4} batch {batch:>3} channels_last {'on ' if cl else 'off'}: "
                  f"{r['samples_per_s']:10.1f} samples/s ({r['steps']} steps, {r['params'] / 1e6:.2f}M params)",
                  flush=True)
            add_ratios(runs)
            if a.json:  # after every row: a run cut off by the GPU check's deadline still returns its rows
                tmp = a.json + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
                               "runs": runs}, f, indent=1)
                os.replace(tmp, a.json)
    if not gpu:
        print("no GPU here: CPU rows only")


if __name__ == "__main__":
    main()
