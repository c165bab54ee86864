#!/usr/bin/env python
"""Why the quickstart's global model swung between rounds, measured on slides no site has seen.

The demo (configs/quickstart.yaml) validates each site on its own slides only
(with 8 slides and val_fraction 0.25: ONE slide per site), so its val_accuracy
says little about the model: this benchmark also scores every round's global
model on H further synthetic slides (default 16) from the same generator and
seed. The demo's slides are slides 0..N-1 of that set, the held-out ones come
after slide 15: new slides from the same "hospitals".

Each configuration is launched as a user launches the demo,
``python -m hpcfl launch configs/quickstart.yaml --set ...`` (mpirun,
aggregator + 2 sites x 2 ranks unless said otherwise), every round's
checkpoint kept; each checkpoint is then evaluated on the held-out tiles.
Configurations (the quickstart's other settings as shipped):

  8 slides              the demo before the fix: 8 slides, 2 local epochs,
                        train.lr 2e-3, model.stain_jitter 0
  8 slides, pooled      the same data and steps without federation: ONE site
                        of 2 ranks owns the 8 slides (6 train, 2 validate: not
                        the federated rows' validation slides)
  8 slides +jitter      model.stain_jitter 0.3 (hpcfl.stain)
  8 slides, pooled +jitter
  16 slides             16 slides, 1 local epoch (as many steps as 8 slides
                        and 2 epochs), lr 2e-3, no jitter
  16 slides +jitter     the same with model.stain_jitter 0.3
  quickstart            configs/quickstart.yaml as shipped (16 slides, 1 epoch,
                        stain_jitter 0.3, lr 1e-3)

Columns, per configuration and run seed (run.seed: model init, which slides
each site owns, shuffling; the slides themselves are always data seed 0):

  val final         the demo's headline figure: val_accuracy after the last round
  val r5-8          min-max of val_accuracy over rounds 5..8
  held-out          accuracy of the final global model on all held-out tiles
  worst slide       its accuracy on the worst held-out slide
  swing             mean over rounds 5..8 and over held-out slides of
                    |accuracy(round r) - accuracy(round r-1)|: how much the
                    global model's behaviour on a given slide moves per round
  wall s            the launch's elapsed_s (summary.json): run time after
                    start-up (slides already synthesized and tiled)

    .venv/bin/python bench/demo_stability.py [--seeds 0,1] [--heldout 16] [--only 'quickstart;16 slides']

7 launches of about a minute per seed on 2 idle cores, plus a few minutes once
to synthesize and tile 16 + H slides (kept in --work for later runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
DEMO_SLIDES = 16  # the most slides a configuration uses; held-out slides come after them
POOLED = ["sites=[{name: pooled, ranks: 2}]"]
BEFORE = ["model.stain_jitter=0", "fl.local_epochs=2", "train.lr=2e-3"]
JITTER = ["model.stain_jitter=0.3", "fl.local_epochs=2", "train.lr=2e-3"]
CONFIGURATIONS: Dict[str, Tuple[int, List[str]]] = {  # name: (slides 0..n-1, --set overrides)
    "8 slides": (8, BEFORE),
    "8 slides, pooled": (8, POOLED + BEFORE),
    "8 slides +jitter": (8, JITTER),
    "8 slides, pooled +jitter": (8, POOLED + JITTER),
    "16 slides": (16, ["model.stain_jitter=0", "fl.local_epochs=1", "train.lr=2e-3"]),
    "16 slides +jitter": (16, ["model.stain_jitter=0.3", "fl.local_epochs=1", "train.lr=2e-3"]),
    "quickstart": (16, []),
}


def prepare(work: Path, heldout: int) -> None:
    """Synthesize 16 + heldout slides once; hard links put slides 0-7 in work/demo8, 0-15 in work/demo16 and the
    rest in work/heldout, which is tiled here (the launches tile their own)."""
    from hpcfl.config import load_config
    from hpcfl.wsi.prepare import tiling_params
    from hpcfl.wsi.synth import synthesize_slides
    from hpcfl.wsi.tiling import tile_directory

    every = work / "all"
    n = DEMO_SLIDES + heldout
    if not (every / f"slide-{n - 1:03d}.tiff").exists() or not (every / "slides.json").exists():
        synthesize_slides(every, n_slides=n, size=4096, seed=0)
    for name, ids in (("demo8", range(8)), ("demo16", range(16)), ("heldout", range(DEMO_SLIDES, n))):
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        for i in ids:
            for suffix in (".tiff", ".mask.png"):
                src, dst = every / f"slide-{i:03d}{suffix}", d / f"slide-{i:03d}{suffix}"
                if not dst.exists():
                    os.link(src, dst)
        (d / "slides.json").write_text((every / "slides.json").read_text())  # the class names
    index = work / "heldout-index"
    if not (index / "index.json").exists():
        tile_directory(work / "heldout", index, tiling_params(load_config(ROOT / CONFIG)))


def launch(work: Path, name: str, seed: int, rounds: int, slides: int, sets: List[str]) -> Path:
    argv = [sys.executable, "-m", "hpcfl", "launch", CONFIG, "--restart", "--no-report"]
    run = name.replace(" ", "").replace(",", "-").replace("+", "-") + f"-s{seed}"
    for s in [f"run.root={work / 'runs'}", f"run.name={run}", f"run.seed={seed}",
              f"data.tiles.slides_dir={work / f'demo{slides}'}", f"data.tiles.index_dir={work / f'demo{slides}-index'}",
              f"data.tiles.synthesize.slides={slides}", f"checkpoint.keep={rounds}", *sets]:
        argv += ["--set", s]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"benchmark run {name} failed ({shlex.join(argv)}):\n{r.stdout}\n{r.stderr}")
    return work / "runs" / run


class HeldOut:
    """The held-out tiles, read once, and per-slide accuracy of a checkpoint on them."""

    def __init__(self, index_dir: Path, input_size: int):
        from hpcfl.wsi.batch import BatchSpec
        from hpcfl.wsi.dataset import TileDataset
        from hpcfl.wsi.index import load_index

        self.index = load_index(index_dir)
        ds = TileDataset(self.index, BatchSpec(input_size, False, 1, False), "cucim")
        items = [(i, 0) for i in range(len(self.index))]
        xs, ys = zip(*(ds.batch(items[b:b + 512]) for b in range(0, len(items), 512)))
        self.x, self.y = np.concatenate([x.numpy() for x in xs]), np.concatenate([y.numpy() for y in ys])

    def per_slide(self, run: Path, checkpoint: Path) -> np.ndarray:
        import torch

        from hpcfl.checkpoint import load_checkpoint
        from hpcfl.config import load_config
        from hpcfl.model import build_model

        cfg = load_config(run / "config.yaml")
        model = build_model(cfg, int(np.prod(self.x.shape[1:])), len(self.index.classes), self.x.shape[1:])
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in load_checkpoint(checkpoint)["model"].items()})
        model.eval()
        with torch.no_grad():
            pred = np.concatenate([model(torch.from_numpy(self.x[b:b + 1024])).argmax(1).numpy()
                                   for b in range(0, len(self.x), 1024)])
        hit = pred == self.y
        return np.array([hit[self.index.slide == s].mean() for s in range(len(self.index.slide_ids))])


def measure(held: HeldOut, run: Path) -> Dict[str, Any]:
    rounds = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if x["kind"] == "round"]
    summary = json.loads((run / "summary.json").read_text())
    acc = [held.per_slide(run, run / "checkpoints" / f"round-{x['round']:06d}.npz") for x in rounds]
    n_tiles = np.bincount(held.index.slide, minlength=len(held.index.slide_ids))
    late = range(max(1, len(rounds) - 4), len(rounds))
    val = [x["val_accuracy"] for x in rounds]
    return {"val": val[-1], "val_late": (min(val[-4:]), max(val[-4:])),
            "heldout": float((acc[-1] * n_tiles).sum() / n_tiles.sum()), "worst": float(acc[-1].min()),
            "swing": float(np.mean([np.abs(acc[r] - acc[r - 1]).mean() for r in late])),
            "wall": summary["elapsed_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1", help="run seeds, comma-separated")
    p.add_argument("--heldout", type=int, default=16, help="held-out slides")
    p.add_argument("--only", default="", help="configurations, separated by ';' (default: all)")
    p.add_argument("--work", default="/tmp/hpcfl-demo-stability", help="slides, indexes and run directories")
    a = p.parse_args()
    names = [n.strip() for n in (a.only.split(";") if a.only else CONFIGURATIONS) if n.strip()]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown:
        sys.exit(f"--only: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGURATIONS)}")
    from hpcfl.config import load_config

    cfg = load_config(ROOT / CONFIG)
    work = Path(a.work)
    t = time.perf_counter()
    prepare(work, a.heldout)
    print(f"slides ready in {time.perf_counter() - t:.0f} s; {CONFIG}: {cfg.fl.rounds} rounds, "
          f"{len(cfg.sites)} sites, {a.heldout} held-out slides", flush=True)
    held = HeldOut(work / "heldout-index", cfg.data.tiles.input_size)
    print("\n| configuration | seed | val final | val r5-8 | held-out | worst slide | swing | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for seed in (int(s) for s in a.seeds.split(",")):
        for name in names:
            m = measure(held, launch(work, name, seed, cfg.fl.rounds, *CONFIGURATIONS[name]))
            print(f"| {name} | {seed} | {m['val']:.3f} | {m['val_late'][0]:.2f}-{m['val_late'][1]:.2f} | "
                  f"{m['heldout']:.3f} | {m['worst']:.3f} | {m['swing']:.3f} | {m['wall']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
