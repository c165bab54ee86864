#!/usr/bin/env python
"""Federated DINO pretraining against the same encoder randomly initialised and trained with labels.

The data: the synthetic slides and tiles of configs/dino.yaml (8 slides of 4096 px, 64-px tiles at
level 1, 4 tissue classes), split as the federation splits them: 2 sites own whole slides, each
site's slides split into training and validation slides. Every encoder is the config's
(``dino.backbone``, ``width``, ``depth``) and is measured the same way, on frozen features of whole
validation tiles:

  k-NN / probe, site banks   each site's k-NN bank (cosine, k = 20, DINO's weighted vote) and
                             linear probe (logistic regression, L-BFGS) come from its own labelled
                             training tiles, scored on its validation tiles, counts summed over
                             sites: what the federation itself reports every round
  k-NN / probe, pooled       one bank and one probe from all sites' training tiles
  classifier                 a supervised model's own accuracy on all validation tiles, at the end
                             and the best of its evaluations during training (chosen on the
                             validation tiles, so optimistic: the strictest reference)

Encoders:
  random init                the federation's initial weights (same seed), untrained
  DINO federated             ``python -m hpcfl launch configs/dino.yaml --set ...`` as a user runs
                             it (aggregator + 2 sites x 2 ranks under mpirun); per round the
                             federation's own val_knn_accuracy / val_probe_accuracy, teacher entropy,
                             student-teacher KL, and training samples/s (all sites' tiles over the
                             round's training time); the final global teacher encoder evaluated here
  supervised federated       the same launch with ``task=classify`` and the encoder with a linear
                             layer (``model.name: hpcfl.tasks.dino.networks:classifier``), tiles
                             flipped and rotated by the tile pipeline: all labels
  supervised pooled          this process, one CPU thread: all sites' training tiles pooled (all of
                             them, and --fraction of each site's), whole tiles flipped, rotated and
                             colour-jittered as DINO's crops are, AdamW at --sup-lr with the config's
                             weight decay and batch size, as many tile presentations as the DINO run
                             (rounds x local epochs x training tiles), validation accuracy every 100 steps

The target line divides the DINO encoder's probe accuracy by the best all-labels supervised
accuracy of the table. Samples/s: the launched federations' rates come from their metrics, the
pooled runs' from this process (one thread), on a shared machine: not a speed comparison.

    python bench/dino.py                                   # configs/dino.yaml as shipped
    python bench/dino.py --set fl.rounds=4 --set fl.local_epochs=2
    python bench/dino.py --standalone                      # the DINO federation simulated in-process (tuning)

Run directories go to --out (runs/bench-dino; the bench's own earlier runs there are replaced).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------- data in memory

@dataclasses.dataclass
class SiteTiles:
    name: str
    x_train: np.ndarray  # (n, 3, s, s) uint8
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def load_config(path: str, overrides: Sequence[str] = ()):
    from hpcfl.config import load_config as load

    return load(path, overrides)


def load_sites(cfg, cache: Optional[Path] = None) -> List[SiteTiles]:
    """Every site's training and validation tiles (the federation's own split), read once."""
    from hpcfl.wsi.index import load_index, site_tiles
    from hpcfl.wsi.prepare import prepare_tiles
    from hpcfl.wsi.readers import open_slide

    t = cfg.data.tiles
    prepare_tiles(cfg, progress=False)
    ix = load_index(t.index_dir)
    if cache is not None and cache.exists():
        z = np.load(cache)
        pixels = z["pixels"]
    else:
        readers: Dict[int, Any] = {}
        pixels = np.empty((len(ix), 3, t.tile_size, t.tile_size), np.uint8)
        for i in range(len(ix)):
            s = int(ix.slide[i])
            r = readers.get(s) or readers.setdefault(s, open_slide(ix.slide_paths[s], t.backend))
            pixels[i] = r.read_region(int(ix.x[i]), int(ix.y[i]), int(ix.level[i]), (int(ix.size[i]),) * 2).transpose(2, 0, 1)
        if cache is not None:
            np.savez(cache, pixels=pixels)
    sites = []
    for k, s in enumerate(cfg.sites):
        tr, va, _ = site_tiles(ix, cfg, k, len(cfg.sites))
        sites.append(SiteTiles(s.name, pixels[tr], ix.label[tr].astype(np.int64), pixels[va], ix.label[va].astype(np.int64)))
    return sites


def as_float(x: np.ndarray, size: int):
    import torch

    from hpcfl.tasks.dino.networks import resize

    t = torch.from_numpy(x).float().div_(255.0)
    return resize(t, size) if t.shape[-1] != size else t


# ----------------------------------------------------------------------------------------- standalone loop


class EvalData:
    """What ``Task.evaluate`` reads: a site's validation tiles and its un-augmented training tiles."""

    def __init__(self, site: SiteTiles, size: int):
        self.site, self.size = site, size

    def _batches(self, x, y, bs):
        import torch

        for b in range(0, len(x), bs):
            yield as_float(x[b:b + bs], self.size), torch.from_numpy(y[b:b + bs])

    def val_batches(self, bs):
        return self._batches(self.site.x_val, self.site.y_val, bs)

    def train_eval_batches(self, bs):
        return self._batches(self.site.x_train, self.site.y_train, bs)


def pooled(sites: Sequence[SiteTiles]) -> SiteTiles:
    cat = lambda a: np.concatenate([getattr(s, a) for s in sites])  # noqa: E731
    return SiteTiles("pooled", cat("x_train"), cat("y_train"), cat("x_val"), cat("y_val"))


def context(round_, rounds, step, steps_per_round, steps_per_epoch, site="solo", site_index=0):
    import torch

    from hpcfl.site import SoloBackend
    from hpcfl.tasks.base import StepContext

    return StepContext(round=round_, rounds=rounds, step=step, steps_per_round=steps_per_round,
                       steps_per_epoch=steps_per_epoch, site=site, site_index=site_index,
                       device=torch.device("cpu"), group=SoloBackend())


def evaluate(task, module, sites: Sequence[SiteTiles], size: int) -> Dict[str, Any]:
    """Per-site k-NN/probe (each site's own bank), summed as the federation sums them."""
    vec = sum(task.evaluate(module, EvalData(s, size), context(1, 1, 0, 1, 1)) for s in sites)
    return task.summarize(vec)


def encoder_eval(encoder, dim: int, sites: Sequence[SiteTiles], cfg) -> Dict[str, Any]:
    """:func:`evaluate` for any frozen encoder (e.g. a supervised classifier's)."""
    import torch

    from hpcfl.site import SoloBackend
    from hpcfl.tasks.dino.evaluate import encoder_scores
    from hpcfl.tasks.dino.task import summarize_scores

    encoder.eval()
    vec = sum(encoder_scores(encoder, dim, 4, EvalData(s, cfg.data.tiles.input_size), SoloBackend(),
                             torch.device("cpu"), cfg.dino.eval, cfg.train.eval_batch_size) for s in sites)
    return summarize_scores(vec)


def train_dino_standalone(cfg, sites: Sequence[SiteTiles], rounds: int, epochs: int, lr: float, batch: int,
                          log=print, eval_every: int = 1) -> Tuple[Any, Any, List[Dict[str, Any]]]:
    """Federated DINO simulated in one process: every site one rank, FedAvg of the exchanged state
    (weighted by training tiles), Adam(W) with a fresh state per round as hpcfl's sites do."""
    import re

    import torch

    from hpcfl.tasks.base import DataSpec
    from hpcfl.tasks.dino import DinoTask

    task = DinoTask(cfg)
    size = cfg.data.tiles.input_size
    torch.manual_seed(cfg.run.seed)
    module = task.build_model(DataSpec((3, size, size), 4))
    names = [n for n, t in module.state_dict().items() if torch.is_floating_point(t)]
    shared = [n for n in names if any(re.search(p, n) for p in task.exchanged())]
    local = [{n: t.clone() for n, t in module.state_dict().items()} for _ in sites]
    weights = np.array([len(s.x_train) for s in sites], np.float64)
    weights /= weights.sum()
    history = []
    for r in range(1, rounds + 1):
        t0, seen = time.perf_counter(), 0
        new = {n: torch.zeros_like(module.state_dict()[n]) for n in shared}
        for k, s in enumerate(sites):
            module.load_state_dict(local[k])
            torch.manual_seed(hash((cfg.run.seed, r, k)) % 2**31)
            params = [p for _, p in task.trainable(module)]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
            spe = len(s.x_train) // batch
            steps = epochs * spe
            module.train()
            for step in range(steps):
                if step % spe == 0:
                    perm = np.random.default_rng([cfg.run.seed, r, k, step]).permutation(len(s.x_train))
                idx = perm[(step % spe) * batch:(step % spe + 1) * batch]
                ctx = context(r, rounds, step, steps, spe, s.name, k)
                loss, stats = task.loss(module, (as_float(s.x_train[idx], size), None), ctx)
                opt.zero_grad()
                loss.backward()
                if cfg.train.grad_clip if hasattr(cfg.train, "grad_clip") else False:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                opt.step()
                task.after_step(module, ctx)
                seen += len(idx)
            local[k] = {n: t.clone() for n, t in module.state_dict().items()}
            for n in shared:
                new[n] += weights[k] * local[k][n]
        for k in range(len(sites)):
            for n in shared:
                local[k][n] = new[n].clone()
        train_s = time.perf_counter() - t0
        rec = {"round": r, "loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()},
               "samples_per_s": seen / train_s}
        if r % eval_every == 0 or r == rounds:
            module.load_state_dict(local[0])
            rec.update(evaluate(task, module, sites, size))
        history.append(rec)
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
    module.load_state_dict(local[0])
    return task, module, history


def train_supervised(cfg, sites: Sequence[SiteTiles], fraction: float, steps: int, lr: float, batch: int,
                     eval_every: int = 100, log=print) -> Tuple[Any, float, List[float]]:
    """The same encoder with a linear layer, trained with labels on the pooled training tiles of all sites
    (``fraction`` of each site's, drawn with the run seed): whole tiles randomly flipped and rotated and
    colour-jittered as DINO's crops are (the stain augmentation that lets a classifier generalise to
    other slides). Returns (classifier, training samples per second, validation accuracy every
    ``eval_every`` steps and at the end)."""
    import torch
    import torch.nn.functional as F

    from hpcfl.tasks.dino.augment import colour, resized_crops
    from hpcfl.tasks.dino.networks import Classifier, make_backbone

    d, c = cfg.dino, cfg.dino.crops
    size = d.eval.size or cfg.data.tiles.input_size
    rng = np.random.default_rng([cfg.run.seed, 99])
    xs, ys = [], []
    for s in sites:
        keep = rng.permutation(len(s.x_train))[:max(1, int(round(fraction * len(s.x_train))))]
        xs.append(s.x_train[keep])
        ys.append(s.y_train[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    pool = pooled(sites)
    torch.manual_seed(cfg.run.seed)
    model = Classifier(make_backbone(d, 3), 4, size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    train_s, seen, accs = 0.0, 0, []
    for step in range(steps):
        t0 = time.perf_counter()
        model.train()
        idx = np.random.default_rng([cfg.run.seed, 98, step]).choice(len(x), size=min(batch, len(x)), replace=False)
        xb = resized_crops(as_float(x[idx], size), 1, size, (1.0, 1.0), True, True)  # whole tile, flipped/rotated
        xb = colour(xb, c.jitter, c.hue, c.jitter_prob, c.grayscale_prob)
        loss = F.cross_entropy(model(xb), torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        seen += len(idx)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            accs.append(classifier_accuracy(model, pool, cfg))
            log(f"supervised {fraction:.0%} step {step + 1}/{steps} loss {float(loss.detach()):.4f} val acc {accs[-1]:.4f}")
    return model, seen / max(train_s, 1e-9), accs


def classifier_accuracy(model, site: SiteTiles, cfg) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(as_float(site.x_val, cfg.data.tiles.input_size)).argmax(1).numpy()
    return float((pred == site.y_val).mean())


# ----------------------------------------------------------------------------------------- federated runs

def launch(config: str, root: Path, name: str, sets: Sequence[str], log=print) -> Tuple[Path, float]:
    """``python -m hpcfl launch`` as a user runs it, into a fresh run directory; (run dir, wall seconds)."""
    import shutil

    run = root / name
    if run.exists():
        shutil.rmtree(run)  # the bench's own scratch run from an earlier invocation
    argv = [sys.executable, "-m", "hpcfl", "launch", config, "--set", f"run.root={root}", "--set", f"run.name={name}",
            *[a for x in sets for a in ("--set", x)]]
    log("$ python " + " ".join(argv[1:]), flush=True)
    t = time.perf_counter()
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"bench/dino.py: {name} failed (rc {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return run, wall


def round_table(run: Path) -> List[Dict[str, Any]]:
    """Per round: the round record's val_* metrics and training samples/s (all sites' samples over the
    round's training time: the slowest slot, sites of a slot in turn)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for r in (x for x in recs if x["kind"] == "round"):
        train = [x for x in recs if x["kind"] == "site" and x["round"] == r["round"] and x.get("split") == "train"]
        samples = sum(x["samples"] for x in train)
        extra = {k: sum(x.get(k, 0.0) * x["samples"] for x in train) / max(samples, 1)
                 for k in ("teacher_entropy", "kl", "loss")}
        rows.append({**r, **extra, "samples": samples, "samples_per_s": samples / max(r["time"]["train_s"], 1e-9)})
    return rows


def final_model(run: Path, rounds: int, task, spec):
    """The global model of the run's last checkpoint, in a fresh module."""
    import torch

    from hpcfl.checkpoint import load_checkpoint, to_state_dict

    torch.manual_seed(0)
    module = task.build_model(spec)
    state = to_state_dict(load_checkpoint(run / "checkpoints" / f"round-{rounds:06d}.npz"))
    missing = set(n for n, t in module.state_dict().items() if torch.is_floating_point(t)) - set(state)
    module.load_state_dict(state, strict=False)
    return module, missing


# ----------------------------------------------------------------------------------------- the benchmark

def fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    import shlex

    import torch

    from hpcfl.tasks.base import DataSpec
    from hpcfl.tasks.dino import DinoTask

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/dino.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override for the DINO federation (and the baselines' shared settings)")
    ap.add_argument("--out", default="runs/bench-dino", help="run root of the launched federations (replaced)")
    ap.add_argument("--fraction", type=float, default=0.1, help="label fraction of the few-labels baseline")
    ap.add_argument("--sup-epochs", type=float, default=0.0,
                    help="supervised epochs over all training tiles (default: the DINO run's rounds x local epochs)")
    ap.add_argument("--sup-lr", type=float, default=1e-3)
    ap.add_argument("--skip-federated-classify", action="store_true",
                    help="do not launch the federated supervised run (task classify, same encoder)")
    ap.add_argument("--standalone", action="store_true",
                    help="simulate the DINO federation in this process (one rank per site) instead of launching it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = (ROOT / args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.sets)
    epochs_per_round = cfg.fl.local_epochs or 1
    print("command: " + shlex.join(["python", os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]))
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} cores; torch {torch.__version__}, 1 thread in this process")
    d = cfg.dino
    print(f"federation: {args.config} {shlex.join(sum((['--set', x] for x in args.sets), []))}: "
          f"{len(cfg.sites)} sites x {cfg.sites[0].ranks} ranks, {cfg.fl.rounds} rounds x {epochs_per_round} local "
          f"epoch(s), {cfg.train.optimizer} lr {cfg.train.lr:g} wd {cfg.train.weight_decay:g}, batch {cfg.train.batch_size}"
          f"/rank; encoder {d.backbone} width {d.width} depth {d.depth}; crops 2 x {d.crops.global_size} px + "
          f"{d.crops.local_crops} x {d.crops.local_size} px; out_dim {d.out_dim}", flush=True)

    t0 = time.perf_counter()
    sites = load_sites(cfg)
    pool = pooled(sites)
    size = cfg.data.tiles.input_size
    spec = DataSpec((3, size, size), 4)
    print(f"data: {', '.join(f'{s.name} {len(s.x_train)} train / {len(s.x_val)} val tiles' for s in sites)} "
          f"(read in {time.perf_counter() - t0:.0f} s)", flush=True)
    task = DinoTask(cfg)
    rows: List[Row] = []

    # 1. the same encoder, randomly initialised (the federation's initial weights: seeded the same way)
    torch.manual_seed(cfg.run.seed)
    rand = task.build_model(spec)
    rows.append(Row("random init", "none", evaluate(task, rand, sites, size), evaluate(task, rand, [pool], size)))
    print("random encoder evaluated", flush=True)

    # 2. federated DINO
    if args.standalone:
        _, dino, hist = train_dino_standalone(cfg, sites, cfg.fl.rounds, epochs_per_round, cfg.train.lr,
                                              cfg.train.batch_size * cfg.sites[0].ranks, log=lambda m: None)
        per_round = [{"round": h["round"], "val_knn_accuracy": h["knn_accuracy"], "val_probe_accuracy": h["probe_accuracy"],
                      "teacher_entropy": h["teacher_entropy"], "kl": h["kl"], "samples_per_s": h["samples_per_s"]}
                     for h in hist]
        label = "DINO, federation simulated in one process"
    else:
        run, wall = launch(args.config, root, "dino", args.sets)
        per_round = round_table(run)
        dino, missing = final_model(run, cfg.fl.rounds, task, spec)
        if any(n.startswith("teacher.backbone") for n in missing):
            sys.exit("bench/dino.py: the teacher's encoder is not in the global model (dino.exchange: student); "
                     "the pooled evaluation needs it")
        label = f"DINO federated, {cfg.fl.rounds} rounds (`hpcfl launch`, {wall:.0f} s)"
    rows.append(Row(label, "none", {"knn_accuracy": per_round[-1]["val_knn_accuracy"],
                                    "probe_accuracy": per_round[-1]["val_probe_accuracy"]},
                    evaluate(task, dino, [pool], size),
                    samples_per_s=float(np.mean([r["samples_per_s"] for r in per_round]))))
    print("federated DINO done", flush=True)

    # 3. supervised: federated with all labels (task classify, same encoder), pooled with all and few labels
    epochs = args.sup_epochs or cfg.fl.rounds * epochs_per_round
    steps = int(round(epochs * len(pool.x_train) / cfg.train.batch_size))
    if not args.skip_federated_classify:
        rows.append(federated_classify(args, cfg, root, sites, pool))
        print("federated supervised done", flush=True)
    for frac in (1.0, args.fraction):
        model, rate, accs = train_supervised(cfg, sites, frac, steps, args.sup_lr, cfg.train.batch_size, log=lambda m: None)
        enc, dim = model.backbone, model.backbone.dim
        rows.append(Row(f"supervised pooled, {steps} steps, flips/rotations/colour jitter", f"{frac:.0%}", encoder_eval(enc, dim, sites, cfg),
                        encoder_eval(enc, dim, [pool], cfg), accs[-1], max(accs), rate))
        print(f"supervised {frac:.0%} done", flush=True)
    report(per_round, rows, pool, time.perf_counter() - t0, root)


@dataclasses.dataclass
class Row:
    encoder: str
    labels: str
    site_banks: Dict[str, Any]
    pooled: Dict[str, Any]
    acc_final: Optional[float] = None  # a supervised classifier's own accuracy
    acc_best: Optional[float] = None  # its best over the evaluations during training (optimistic)
    samples_per_s: Optional[float] = None


def federated_classify(args, cfg, root: Path, sites, pool) -> Row:
    """The same federation trained with labels: task classify, the DINO encoder with a linear layer."""
    from hpcfl.checkpoint import load_checkpoint, to_state_dict
    from hpcfl.tasks.dino.networks import classifier

    d, size = cfg.dino, cfg.data.tiles.input_size
    model_args = {"backbone": d.backbone, "width": d.width, "depth": d.depth, "patch_size": d.patch_size,
                  "heads": d.heads}
    sets = [*args.sets, "task=classify", "model.name=hpcfl.tasks.dino.networks:classifier",
            "model.args=" + json.dumps(model_args), "data.tiles.augment=true", "eval.best_metric=val_accuracy",
            f"train.lr={args.sup_lr}"]
    run, wall = launch(args.config, root, "classify", sets)
    rounds = round_table(run)
    model = classifier(3 * size * size, 4, **model_args)
    model.load_state_dict(to_state_dict(load_checkpoint(run / "checkpoints" / f"round-{cfg.fl.rounds:06d}.npz")))
    enc, dim = model.backbone, model.backbone.dim
    accs = [r["val_accuracy"] for r in rounds]
    return Row(f"supervised federated, task classify, flips/rotations (`hpcfl launch`, {wall:.0f} s)", "100%",
               encoder_eval(enc, dim, sites, cfg), encoder_eval(enc, dim, [pool], cfg), accs[-1], max(accs),
               float(np.mean([r["samples_per_s"] for r in rounds])))


def report(per_round, rows: Sequence[Row], pool: SiteTiles, total_s: float, root: Path) -> None:
    print("\nFederated DINO per round (validation tiles of both sites; k-NN bank and probe: each site's own "
          "labelled training tiles)\n")
    print("| round | k-NN acc | probe acc | teacher entropy | KL student-teacher | train samples/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in per_round:
        print(f"| {r['round']} | {fmt(r['val_knn_accuracy'])} | {fmt(r['val_probe_accuracy'])} | "
              f"{r['teacher_entropy']:.3f} | {r['kl']:.3f} | {r['samples_per_s']:.1f} |")
    print(f"\nEncoders compared on the {len(pool.x_val)} validation tiles. k-NN and probe on the frozen encoder: "
          f"'site banks' = each site's bank and probe from its own labelled training tiles (as the federation "
          f"evaluates), 'pooled' = one bank and probe from all {len(pool.x_train)}. Classifier: the supervised "
          f"model's own accuracy at the end, and its best over evaluations during training (chosen on the "
          f"validation tiles: optimistic)\n")
    print("| encoder | labels | k-NN, site banks | probe, site banks | k-NN, pooled | probe, pooled | "
          "classifier, final | classifier, best | train samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.encoder} | {r.labels} | {fmt(r.site_banks.get('knn_accuracy'))} | "
              f"{fmt(r.site_banks.get('probe_accuracy'))} | {fmt(r.pooled.get('knn_accuracy'))} | "
              f"{fmt(r.pooled.get('probe_accuracy'))} | {fmt(r.acc_final)} | {fmt(r.acc_best)} | "
              f"{'-' if r.samples_per_s is None else f'{r.samples_per_s:.1f}'} |")
    full = [r for r in rows if r.labels == "100%"]
    ref = max(full, key=lambda r: r.acc_best)
    random_, dino = rows[0], rows[1]
    for key, what in (("site_banks", "site banks"), ("pooled", "pooled")):
        probe = getattr(dino, key)["probe_accuracy"]
        print(f"target ({what}): DINO probe {probe:.4f} / best all-labels supervised accuracy {ref.acc_best:.4f} "
              f"({ref.encoder}) = {probe / ref.acc_best:.3f} (target >= 0.9); random encoder's probe "
              f"{getattr(random_, key)['probe_accuracy']:.4f}")
    print(f"total {total_s:.0f} s; runs in {root}")

if __name__ == "__main__":
    main()
