#!/usr/bin/env python
"""hpcfl's local training step next to a plain torch loop on the same work, in one process.

Issue 22's CPU target (a steady round <= 1.15x the plain loop's) is mostly a per-step
question: a round of pfl's benchmark shape is 250 steps of batch 10. This bench runs
hpcfl's real step (hpcfl.site.trainer.SiteTrainer.train_round: flat parameters and
gradients, the flat optimizer, the heartbeat, the loss sums) and the plain loop
(torch.optim.SGD, ``zero_grad()`` to None, ``backward``, ``step``) on the same model,
batches and learning rate, in interleaved blocks (A B A B ...: the load of a shared
machine moves), one torch thread, and prints per step the CPU milliseconds of each
(min and median over blocks) and their ratio.

Models: pfl-research's small CNN on 3x32x32 (batch 10, 1.6M parameters: vs_pfl's
cases b, c) and the digits MLP 64-256-10 (batch 32: vs_pfl's case a).

    python bench/local_step.py [--blocks 12] [--steps 40] [--models cnn mlp] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {"cnn": ((3, 32, 32), 10, 10), "mlp": ((64,), 10, 32)}  # input shape, classes, batch


def build(name: str) -> Any:
    from vs_pfl import mlp, simple_cnn

    shape, classes, _ = SHAPES[name]
    n = 1
    for s in shape:
        n *= s
    return simple_cnn(n, classes) if name == "cnn" else mlp(n, classes)


def _factory_cnn(num_features: int, num_classes: int, **_: Any) -> Any:
    return build("cnn")


def _factory_mlp(num_features: int, num_classes: int, **_: Any) -> Any:
    return build("mlp")


def batches(name: str, count: int):
    import torch

    shape, classes, batch = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(count * batch, *shape, generator=g)
    y = torch.randint(0, classes, (count * batch,), generator=g)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)]


def plain_runner(name: str, data: List[Any], lr: float):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def run() -> None:
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return run


def hpcfl_runner(name: str, data: List[Any], lr: float):
    import torch

    from hpcfl.config import from_dict
    from hpcfl.site import SoloBackend
    from hpcfl.site.trainer import SiteSettings, SiteTrainer
    from hpcfl.tasks import DataSpec
    from hpcfl.tasks.classify import ClassifyTask

    shape, classes, batch = SHAPES[name]
    cfg = from_dict({"sites": [{"name": "a"}], "data": {"name": "digits"},
                     "model": {"name": f"{__name__}:_factory_{name}"},
                     "train": {"optimizer": "sgd", "lr": lr, "momentum": 0.0, "batch_size": batch}})
    tr = SiteTrainer(cfg, ClassifyTask(cfg), DataSpec(shape, classes), SoloBackend(), torch.device("cpu"))
    tr.on_step = lambda: None  # as the slot's heartbeat: one call per step

    class Data:
        num_train = len(data) * batch

        def steps_per_epoch(self, bs):
            return len(data)

        def epoch_batches(self, round_, epoch, bs):
            return iter(data)

    class Site:
        name, index = "a", 0

    settings = SiteSettings(lr=lr, batch_size=batch, epochs=1, steps=None)
    rounds = [0]

    def run() -> None:
        rounds[0] += 1
        tr.train_round(Site, 0, rounds[0], settings, Data())
    return run


def measure(name: str, blocks: int, steps: int) -> Dict[str, Any]:
    data = batches(name, steps)
    sides = {"plain": plain_runner(name, data, 0.01), "hpcfl": hpcfl_runner(name, data, 0.01)}
    for run in sides.values():  # warm-up: first calls allocate and pick kernels
        run()
    ms: Dict[str, List[float]] = {k: [] for k in sides}
    for b in range(blocks):
        order = list(sides) if b % 2 == 0 else list(sides)[::-1]
        for k in order:
            t = time.process_time()
            sides[k]()
            ms[k].append((time.process_time() - t) / steps * 1e3)
    out: Dict[str, Any] = {"model": name, "batch": SHAPES[name][2], "steps": steps, "blocks": blocks}
    for k, v in ms.items():
        out[f"{k}_min_ms"], out[f"{k}_median_ms"] = min(v), statistics.median(v)
    out["ratio_min"] = out["hpcfl_min_ms"] / out["plain_min_ms"]
    out["ratio_median"] = out["hpcfl_median_ms"] / out["plain_median_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=sorted(SHAPES))
    ap.add_argument("--blocks", type=int, default=12, help="interleaved blocks per side")
    ap.add_argument("--steps", type=int, default=40, help="steps per block")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = [measure(m, args.blocks, args.steps) for m in args.models]
    print(f"CPU ms per local step, one torch thread, {args.blocks} interleaved blocks of {args.steps} steps")
    print(f"{'model':6} {'batch':>5}  {'plain min':>9} {'hpcfl min':>9} {'ratio':>6}  "
          f"{'plain med':>9} {'hpcfl med':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:6} {r['batch']:5d}  {r['plain_min_ms']:9.3f} {r['hpcfl_min_ms']:9.3f} {r['ratio_min']:6.3f}  "
              f"{r['plain_median_ms']:9.3f} {r['hpcfl_median_ms']:9.3f} {r['ratio_median']:6.3f}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
