#!/usr/bin/env python
"""Slide AUC of federated attention MIL on (a) the federated DINO encoder's features, (b) the same encoder
randomly initialised, (c) MIL trained centrally on the pooled features of (a): the upper bound.

The data are configs/pathology.yaml's: 80 synthetic slides from 2 hospitals (each its own stain shift and
share of tumour slides), each hospital owning its slides. Every slide has an epithelial focus (20-40% of its
tissue); a slide is `tumour` when the focus's nuclei are atypical (pleomorphic) and `normal` when they are
uniform, at equal colour, nuclear area and density (data.tiles.synthesize.pattern: atypia), so the label
needs features that see nuclear shape. The pipeline's own stages make the slides, the DINO encoder
(configs/pathology-dino.yaml) and its features; this bench adds

  random init   a run directory holding the DINO federation's initial weights (same seed, untrained),
                embedded by `hpcfl features` into data/pathology/features-random
  (a), (b)      `hpcfl launch configs/pathology.yaml --set pipeline=null --set run.seed=S` on each
                feature set: 2 sites, the config's rounds and local epochs, as a user runs it
  (c)           this process: the same network, optimizer, batch size and number of epochs
                (rounds x local epochs) on all training slides of both sites, scored on the same
                validation slides

run.seed S changes each site's split of its slides into training and validation slides, the model's
initialisation and the shuffling; every column uses the same S's split. AUC: the pooled ROC AUC of
the final global model over both sites' validation slides (rank 0's val_auc of the last round).

    python bench/pathology.py                  # seeds 0-4
    python bench/pathology.py --seeds 0,1,2
    python bench/pathology.py --seeds 0,1,2 --set mil.instance_loss=svm   # with CLAM's instance loss
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "runs" / "bench-pathology"


def hpcfl(*args: str) -> None:
    cmd = [sys.executable, "-m", "hpcfl", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def random_encoder_run(pre_cfg_path: Path, out: Path, overrides: Sequence[str] = ()) -> Path:
    """A run directory holding the DINO federation's initial weights (what its round 1 starts from)."""
    import torch

    from hpcfl.checkpoint import write_npz_atomic
    from hpcfl.config import dump_yaml, load_config
    from hpcfl.tasks import DataSpec, make_task
    from hpcfl.wsi.index import load_index

    cfg = load_config(pre_cfg_path, overrides)
    run = out / "random-init"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(cfg.run.seed)  # as the trainer seeds before building the model
    size = cfg.data.tiles.input_size
    module = make_task(cfg).build_model(DataSpec((3, size, size), len(load_index(cfg.data.tiles.index_dir).classes)))
    arrays = {f"model/{k}": v.numpy() for k, v in module.state_dict().items() if v.is_floating_point()}
    write_npz_atomic(run / "best.npz", arrays, {"round": 0})
    return run


def federated_auc(name: str, features: str, seed: int, extra: Sequence[str]) -> Dict[str, float]:
    run = OUT / name
    if run.exists():
        shutil.rmtree(run)
    hpcfl("launch", "configs/pathology.yaml", "--no-report", "--set", "pipeline=null", "--set", f"run.seed={seed}",
          "--set", f"run.root={OUT}", "--set", f"run.name={name}", "--set", f"data.bags.dir={features}", *extra)
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in x]
    last = rounds[-1]
    return {"auc": last["val_auc"], "balanced_accuracy": last["val_balanced_accuracy"],
            "best_auc": max(r["val_auc"] for r in rounds if r.get("val_auc") is not None)}


def central_auc(cfg, seed: int) -> Dict[str, float]:
    """MIL on the pooled training slides of every site (the federation's split for this seed), one process:
    the task's own network and loss (so mil.instance_loss applies here too)."""
    import dataclasses

    import torch

    from hpcfl.features.bags import pad, slide_labels, split
    from hpcfl.features.store import load_bags
    from hpcfl.tasks import DataSpec
    from hpcfl.tasks.mil import MilTask, roc_auc

    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
    lab = slide_labels(cfg)
    parts = [split(cfg, lab, k) for k in range(len(cfg.sites))]
    train = np.concatenate([p[0] for p in parts])
    val = np.concatenate([p[1] for p in parts])
    bags = dict(zip(range(len(lab.slide_ids)), load_bags(cfg.data.bags.dir, lab.slide_ids)))
    torch.manual_seed(seed)
    task = MilTask(cfg)
    net = task.build_model(DataSpec((bags[0].features.shape[1],), len(lab.classes)))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rng = np.random.default_rng(seed)
    cap, bs = cfg.data.bags.max_tiles, cfg.train.batch_size
    for _ in range(cfg.fl.rounds * (cfg.fl.local_epochs or 1)):
        net.train()
        order = rng.permutation(train)
        for b in range(0, len(order), bs):
            chunk = order[b:b + bs].tolist()
            feats = []
            for p in chunk:
                f = bags[p].features
                feats.append(f[np.sort(rng.choice(len(f), cap, replace=False))] if len(f) > cap else f)
            loss, _ = task.loss(net, pad(feats, [(lab.labels[p], p) for p in chunk], feats[0].shape[1]), None)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        probs = [torch.softmax(net(torch.from_numpy(bags[p].features)[None], torch.tensor([len(bags[p].features)]))[0],
                               1)[0, 1].item() for p in val.tolist()]
    y = np.asarray([lab.labels[p] for p in val.tolist()])
    pred = (np.asarray(probs) > 0.5).astype(int)
    bal = np.mean([(pred[y == c] == c).mean() for c in (0, 1) if (y == c).any()])
    return {"auc": roc_auc(y == 1, np.asarray(probs)), "balanced_accuracy": float(bal)}


def focus_probe(cfg, feature_dirs: Dict[str, str]) -> None:
    """What the features hold, without MIL: a logistic regression on the focus tiles only (the tiles whose mask
    class is `tumor`, which MIL never sees) predicting their slide's label, 5-fold CV grouped by slide; tile AUC,
    and slide AUC of the mean score of a slide's focus tiles."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hpcfl.features.bags import slide_labels
    from hpcfl.features.store import load_bags
    from hpcfl.wsi.index import load_index

    lab = slide_labels(cfg)
    index = load_index(load_config_of(cfg.pipeline.pretrain).data.tiles.index_dir)
    focus = index.classes.index("tumor")
    print("\nfocus-tile probe (logistic regression on the focus tiles' features, 5-fold CV grouped by slide)")
    for name, d in feature_dirs.items():
        x, y, g = [], [], []
        for s, bag in zip(range(len(lab.slide_ids)), load_bags(d, lab.slide_ids)):
            keep = index.label[index.slide == index.slide_ids.index(bag.slide_id)] == focus
            x.append(bag.features[keep].astype(np.float32))
            y += [lab.labels[s]] * int(keep.sum())
            g += [s] * int(keep.sum())
        x, y, g = np.concatenate(x), np.asarray(y), np.asarray(g)
        p = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)), x, y, groups=g,
                              cv=GroupKFold(5), method="predict_proba")[:, 1]
        slides = np.unique(g)
        slide_auc = roc_auc_score([y[g == s][0] for s in slides], [p[g == s].mean() for s in slides])
        print(f"  {name}: {len(y)} focus tiles of {len(slides)} slides, tile AUC {roc_auc_score(y, p):.4f}, "
              f"slide AUC (mean of its focus tiles) {slide_auc:.4f}")


def load_config_of(path: str):
    from hpcfl.config import load_config

    return load_config(ROOT / path)


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="run.seed values (default 0-4)")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="more --set for the MIL runs, e.g. mil.instance_loss=svm (all three columns)")
    ap.add_argument("--probe-only", action="store_true",
                    help="only the focus-tile probe of the existing feature sets (after a full run)")
    args = ap.parse_args(list(argv) or None)
    seeds = [int(s) for s in args.seeds.split(",")]
    from hpcfl.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "pathology.yaml", args.extra)  # (c) gets the same --set as (a), (b)
    dino_dir = cfg.data.bags.dir
    rand_dir = str(Path(dino_dir).parent / "features-random")
    if args.probe_only:
        focus_probe(cfg, {"DINO": dino_dir, "random encoder": rand_dir})
        return 0
    hpcfl("launch", "configs/pathology.yaml", "--no-report", "--set", "pipeline.stages=[pretrain, features]")
    rand_run = random_encoder_run(ROOT / cfg.pipeline.pretrain, OUT)
    hpcfl("features", str(rand_run), "--out", rand_dir, "--redo")
    extra = [a for e in args.extra for a in ("--set", e)]
    rows: List[Dict[str, Dict[str, float]]] = []
    for s in seeds:
        row = {"dino": federated_auc(f"dino-s{s}", dino_dir, s, extra),
               "random": federated_auc(f"random-s{s}", rand_dir, s, extra),
               "central": central_auc(cfg, s)}
        rows.append(row)
        print(f"seed {s}: " + "  ".join(f"{k} auc {v['auc']:.4f}" for k, v in row.items()), flush=True)
    print_table(seeds, rows, time.perf_counter() - t0)
    focus_probe(cfg, {"DINO": dino_dir, "random encoder": rand_dir})
    return 0


def print_table(seeds: Sequence[int], rows: Sequence[Dict[str, Dict[str, float]]], seconds: float) -> None:
    cols = [("dino", "(a) federated MIL, DINO features"), ("random", "(b) federated MIL, random-encoder features"),
            ("central", "(c) central MIL, DINO features (pooled)")]
    print(f"\nslide AUC, final global model, pooled over both sites' validation slides ({seconds:.0f} s in all)")
    print("| run.seed | " + " | ".join(c for _, c in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for s, r in zip(seeds, rows):
        print(f"| {s} | " + " | ".join(f"{r[k]['auc']:.4f}" for k, _ in cols) + " |")
    for stat, fn in (("mean", np.mean), ("std", np.std)):
        print(f"| {stat} | " + " | ".join(f"{fn([r[k]['auc'] for r in rows]):.4f}" for k, _ in cols) + " |")
    bal = " | ".join(f"{np.mean([r[k]['balanced_accuracy'] for r in rows]):.4f}" for k, _ in cols)
    print(f"| mean balanced accuracy | {bal} |")
    a = np.asarray([r["dino"]["auc"] for r in rows])
    b = np.asarray([r["random"]["auc"] for r in rows])
    print(f"\n(a) - (b): mean {np.mean(a - b):+.4f}, (a) > (b) in {int((a > b).sum())} of {len(a)} seeds")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
