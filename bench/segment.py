#!/usr/bin/env python
"""task segment: MONAI's data pipelines side by side, federation round time, and Dice against an untrained model.

``pipeline`` (default): one site's synthetic NIfTI volumes (configs/segment-3d.yaml's generator, in
--out), the same volumes, patches and UNet through two pipelines, measured in turns in this process
(one CPU thread), each for --epochs epochs after one warm-up epoch:

  plain    monai.data.Dataset + torch DataLoader: every epoch loads the NIfTI files, orients,
           scales, pads and indexes foreground/background again (segment.cache: none,
           thread_loader: false)
  cached   CacheDataset (those deterministic stages once, at start) + ThreadDataLoader (the random
           crops and flips in a background thread): hpcfl's default (segment.cache: cache)

Per pipeline: the time to build it (caching included), an epoch of batches alone ("data"), and an
epoch of training steps on them ("train": data + forward/backward/Adam step). Then the whole
federation: ``hpcfl launch configs/segment-3d.yaml`` with each pipeline, mean round time of rounds
2.. (round 1 includes start-up) from metrics.jsonl. MONAI's 3D spleen report is the reference for
which stages matter (loading and deterministic transforms, cached once).

``seeds``: each config launched as shipped for --seeds, its final val_mean_dice (the global model on
every site's validation data, Dice from the pooled counts) next to the mean Dice of the federation's
initial (untrained) global model, evaluated here on the same data the same way.

    python bench/segment.py                                  # pipeline table
    python bench/segment.py seeds --seeds 0,1,2              # both configs, 3 seeds each
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("configs/segment-3d.yaml", "configs/segment-tiles.yaml")


def site_of(cfg, index: int):
    from hpcfl.site.data import SiteRank

    site = types.SimpleNamespace(index=index, name=cfg.sites[index].name, size=1)
    return SiteRank(site, 0, index + 1), types.SimpleNamespace(sites=list(cfg.sites))


def pipeline_cfg(base, kind: str):
    import dataclasses

    seg = dataclasses.replace(base.segment, cache="none" if kind == "plain" else "cache",
                              thread_loader=kind != "plain")
    return dataclasses.replace(base, segment=seg)


def epoch(data, task, module, opt, ctx, e: int, batch: int, train: bool) -> float:
    t = time.perf_counter()
    for x, y in data.epoch_batches(1, e, batch):
        if train:
            loss, _ = task.loss(module, (x, y), ctx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t


def measure_pipelines(args) -> List[Dict[str, Any]]:
    import torch

    from hpcfl.config import load_config
    from hpcfl.site import SoloBackend
    from hpcfl.tasks import DataSpec, StepContext, make_task
    from hpcfl.tasks.segment import SegmentTask

    torch.set_num_threads(1)
    base = load_config(ROOT / CONFIGS[0], [f"data.volumes.root={args.out}/volumes",
                                           f"data.volumes.synthesize.volumes={args.volumes}",
                                           f"data.volumes.synthesize.size=[{args.size}, {args.size}, {args.size}]"])
    SegmentTask.prepare_data(base)
    role, topo = site_of(base, 0)
    import monai.data  # noqa: F401 - imported before the clocks start (the first pipeline would pay for it)
    import monai.networks.nets  # noqa: F401
    import monai.transforms  # noqa: F401

    rows = {}
    built = {}
    for kind in ("plain", "cached"):
        cfg = pipeline_cfg(base, kind)
        t = time.perf_counter()
        data = SegmentTask.site_data(cfg, topo, role, args.out, {}, torch.device("cpu"))
        build = time.perf_counter() - t
        task = make_task(cfg)
        torch.manual_seed(0)
        module = task.build_model(DataSpec(data.input_shape, data.num_classes))
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        ctx = StepContext(1, 1, 0, 1, 1, role.site.name, 0, torch.device("cpu"), SoloBackend())
        built[kind] = (data, task, module, opt, ctx, cfg.train.batch_size)
        rows[kind] = {"pipeline": kind, "build_s": build, "data_s": [], "train_s": [],
                      "items": data.epoch_items, "patch": "x".join(map(str, cfg.segment.patch_size))}
    for kind in built:  # warm-up epoch (first batches, allocator)
        data, task, module, opt, ctx, bs = built[kind]
        epoch(data, task, module, opt, ctx, 0, bs, True)
    for e in range(1, args.epochs + 1):  # in turns, so both see the same machine load
        for kind in built:
            data, task, module, opt, ctx, bs = built[kind]
            rows[kind]["data_s"].append(epoch(data, task, module, opt, ctx, e, bs, False))
            rows[kind]["train_s"].append(epoch(data, task, module, opt, ctx, e, bs, True))
    for kind in built:
        built[kind][0].close()
    return list(rows.values())


def launch(config: str, root: Path, name: str, sets: Sequence[str]) -> Path:
    import shutil

    run = root / name
    if run.exists():
        shutil.rmtree(run)  # the bench's own run from an earlier invocation
    argv = [sys.executable, "-m", "hpcfl", "launch", config, "--no-report", "--set", f"run.root={root}",
            "--set", f"run.name={name}", *[a for x in sets for a in ("--set", x)]]
    print("$ python " + " ".join(argv[1:]), flush=True)
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench/segment.py: {name} failed (rc {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return run


def rounds(run: Path) -> List[Dict[str, Any]]:
    import json

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r["kind"] == "round"]


def federation_rounds(args) -> List[Dict[str, Any]]:
    out = []
    for kind, sets in (("plain", ["segment.cache=none", "segment.thread_loader=false"]),
                       ("cached", ["segment.cache=cache", "segment.thread_loader=true"])):
        run = launch(CONFIGS[0], args.out, f"segment-3d-{kind}", [f"fl.rounds={args.rounds}", *sets])
        rs = rounds(run)
        later = rs[1:] or rs
        out.append({"pipeline": kind, "round_s": float(np.mean([r["time"]["round_s"] for r in later])),
                    "train_s": float(np.mean([r["time"]["train_s"] for r in later])),
                    "data_s": float(np.mean([r["time"]["data_s"] for r in later])),
                    "final": rs[-1]["val_mean_dice"]})
    return out


def untrained_dice(config: str, seed: int, run_dir: Path) -> float:
    """Mean Dice of the federation's initial global model (seeded as the trainer seeds it) on every site's
    validation data, from the summed counts, as the federation reports val_mean_dice."""
    import torch

    from hpcfl.config import load_config
    from hpcfl.site import SoloBackend
    from hpcfl.tasks import DataSpec, StepContext, make_task

    torch.set_num_threads(1)
    cfg = load_config(run_dir / "config.yaml")
    task = make_task(cfg)
    total, module = None, None
    for i in range(len(cfg.sites)):
        role, topo = site_of(cfg, i)
        data = task.site_data(cfg, topo, role, run_dir, {}, torch.device("cpu"))
        if module is None:
            torch.manual_seed(cfg.run.seed)
            module = task.build_model(DataSpec(data.input_shape, data.num_classes))
            module.eval()
        ctx = StepContext(1, 1, 0, 1, 1, role.site.name, i, torch.device("cpu"), SoloBackend())
        vec = task.evaluate(module, data, ctx)
        total = vec if total is None else total + vec
        data.close()
    return float(task.summarize(total)["mean_dice"])


def seeds(args) -> None:
    print("| config | run.seed | untrained mean Dice | final val_mean_dice | best (round) | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for config in args.configs.split(","):
        for s in [int(x) for x in args.seeds.split(",")]:
            t = time.perf_counter()
            run = launch(config, args.out, f"{Path(config).stem}-seed{s}", [f"run.seed={s}"])
            wall = time.perf_counter() - t
            rs = rounds(run)
            best = max(rs, key=lambda r: r["val_mean_dice"])
            before = untrained_dice(config, s, run)
            print(f"| {Path(config).name} | {s} | {before:.4f} | {rs[-1]['val_mean_dice']:.4f} | "
                  f"{best['val_mean_dice']:.4f} ({best['round']}) | {wall:.0f} |", flush=True)


def pipeline(args) -> None:
    rows = measure_pipelines(args)
    print(f"\none site's data: {args.volumes} synthetic volumes of {args.size}^3 (training: {rows[0]['items']} on this "
          f"rank), patches {rows[0]['patch']}, {args.epochs} epochs each after a warm-up, 1 thread")
    print("| pipeline | build s | epoch, data only s | epoch, training s | data speed-up | training speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = rows[0]
    for r in rows:
        d, t = float(np.median(r["data_s"])), float(np.median(r["train_s"]))
        print(f"| {r['pipeline']} | {r['build_s']:.2f} | {d:.3f} | {t:.3f} | "
              f"{np.median(ref['data_s']) / d:.1f}x | {np.median(ref['train_s']) / t:.2f}x |")
    if args.rounds:
        fed = federation_rounds(args)
        print(f"\nconfigs/segment-3d.yaml, {args.rounds} rounds, mean of rounds 2..{args.rounds}:")
        print("| pipeline | round s | local training s | data wait s (slowest site) | final val_mean_dice |")
        print("|---|---:|---:|---:|---:|")
        for r in fed:
            print(f"| {r['pipeline']} | {r['round_s']:.2f} | {r['train_s']:.2f} | {r['data_s']:.3f} | {r['final']:.4f} |")
        print(f"round time plain / cached: {fed[0]['round_s'] / fed[1]['round_s']:.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["pipeline", "seeds"], default="pipeline")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-segment")
    p.add_argument("--volumes", type=int, default=12, help="pipeline: synthetic volumes of the measured site")
    p.add_argument("--size", type=int, default=64, help="pipeline: their side, voxels")
    p.add_argument("--epochs", type=int, default=3, help="pipeline: measured epochs per pipeline")
    p.add_argument("--rounds", type=int, default=4, help="pipeline: rounds of each federation (0 = none)")
    p.add_argument("--seeds", default="0,1,2", help="seeds: run seeds")
    p.add_argument("--configs", default=",".join(CONFIGS), help="seeds: configs, comma-separated")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    import os

    os.chdir(ROOT)  # the configs' data folders are relative to the repository, as for `make demo`
    args.out.mkdir(parents=True, exist_ok=True)
    (seeds if args.mode == "seeds" else pipeline)(args)


if __name__ == "__main__":
    main()
