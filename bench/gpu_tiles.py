#!/usr/bin/env python
"""The tile data path on a GPU against the CPU, side by side in one run (about a minute on one GPU).

* decode: the same unaligned 224-px crops of synthetic JPEG slides (Pillow-written,
  hpcfl.wsi.minitiff), read through hpcfl's cuCIM reader with the tile cache off:
  one region per call on the CPU; batches of 64 per call on the CPU (1 and N reading
  threads); batches of 64 decoded on the GPU (nvJPEG). tiles/s.
* batch math: one batch of 64 decoded tiles resized 224 -> 64, flipped/rotated by
  item seed, converted to float CHW (hpcfl.wsi.batch.assemble) with NumPy on the
  host, and with CuPy on the GPU (tiles already there, and uploaded from the host).
* training: the quickstart CNN (input 64) on the GPU, the same samples either held
  in GPU memory or fed by TileData's paths: CPU decode + NumPy + pinned memory +
  non-blocking copy; CPU decode + CuPy; GPU decode + CuPy (DLPack, no host copy);
  each through the prefetch thread, as a site rank runs them. samples/s.

Rates are the best of --repeats passes taken round-robin. Without a GPU it says so
and exits 0 (``--allow-cpu`` measures the CPU columns anyway, for testing this script).

    python bench/gpu_tiles.py --json gpu_tiles.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CROP, BATCH, INPUT = 224, 64, 64


def gpu_state() -> Dict[str, Any]:
    """What this machine offers: torch's CUDA, the device, CuPy, cuCIM (each with why not)."""
    import torch

    s: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda_available": bool(torch.cuda.is_available()), "cpu_cores": os.cpu_count()}
    if s["cuda_available"]:
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        s.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                 torch_cuda=torch.version.cuda)
    from hpcfl.wsi.feed import cupy_problem

    s["cupy_problem"] = cupy_problem() if s["cuda_available"] else "no CUDA device"
    try:
        import cupy

        s["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001
        s["cupy"] = f"n/a ({type(exc).__name__})"
    try:
        import cucim

        s["cucim"] = cucim.__version__
    except Exception as exc:  # noqa: BLE001
        s["cucim"] = f"n/a ({type(exc).__name__}: {exc})"
    return s


def make_slides(work: Path, n: int, size: int, log) -> List[str]:
    from hpcfl.wsi.minitiff import texture, write_jpeg_tiff

    paths = []
    for i in range(n):
        p = work / f"gpu-slide-{i}-{size}.tiff"
        if not p.exists():
            t = time.perf_counter()
            write_jpeg_tiff(p, texture(size, seed=i))
            log(f"wrote {p.name} in {time.perf_counter() - t:.1f} s")
        paths.append(str(p))
    return paths


def crop_index(paths: Sequence[str], size: int, per_slide: int, seed: int):
    """Unaligned 224 crops (every one spans several 256-px JPEG tiles), as a TileIndex, in a shuffled order."""
    from hpcfl.wsi.index import TileIndex

    rng = np.random.default_rng(seed)
    xs, ys, ss = [], [], []
    for s in range(len(paths)):
        xs.append(rng.integers(0, size - CROP, per_slide))
        ys.append(rng.integers(0, size - CROP, per_slide))
        ss.append(np.full(per_slide, s, np.int32))
    n = per_slide * len(paths)
    return TileIndex(classes=["a", "b", "c", "d"], slide_ids=[Path(p).stem for p in paths], slide_paths=list(paths),
                     slide=np.concatenate(ss), x=np.concatenate(xs).astype(np.int64),
                     y=np.concatenate(ys).astype(np.int64), level=np.zeros(n, np.int16),
                     size=np.full(n, CROP, np.int32), label=rng.integers(0, 4, n).astype(np.int16))


def round_robin(fns: Dict[str, Callable[[], int]], repeats: int) -> Dict[str, List[float]]:
    """Items/s of every function (it returns how many items it processed), after one warm-up call
    each (first CUDA/nvJPEG use, page cache), ``repeats`` times, taken in turn."""
    for fn in fns.values():
        fn()
    rates: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            n = fn()
            rates[k].append(n / (time.perf_counter() - t))
    return rates


def run(args, log) -> Dict[str, Any]:
    from hpcfl.wsi.cache import configure_cache

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hpcfl-gpu-tiles-"))
    work.mkdir(parents=True, exist_ok=True)
    configure_cache("nocache", 1, work)  # every read decodes: real slides do not fit in a tile cache
    import torch

    state = gpu_state()
    gpu = state["cuda_available"] and state["cupy_problem"] is None
    res: Dict[str, Any] = {"machine": state, "gpu": gpu, "repeats": args.repeats}
    paths = make_slides(work, args.slides, args.size, log)
    ix = crop_index(paths, args.size, args.tiles // args.slides, args.seed)
    from hpcfl.wsi.readers import shared_reader, warm_up_cucim

    warm_up_cucim(paths[0])
    readers = [shared_reader(p) for p in paths]
    cores = os.cpu_count() or 1
    locs = [[(int(x), int(y)) for x, y in zip(ix.x[ix.slide == s], ix.y[ix.slide == s])] for s in range(len(paths))]
    n = sum(len(v) for v in locs)

    # --- decode
    def single():
        for r, ls in zip(readers, locs):
            for x, y in ls:
                r.read_region(x, y, 0, (CROP, CROP))
        return n

    def batched(device: str, workers: int):
        def go():
            for r, ls in zip(readers, locs):
                for b in range(0, len(ls), BATCH):
                    r.read_batch(ls[b:b + BATCH], 0, (CROP, CROP), device, workers)
            if device != "cpu":
                torch.cuda.synchronize()
            return n
        return go

    decode = {"cpu_single": single, "cpu_batch_1thread": batched("cpu", 1),
              f"cpu_batch_{cores}threads": batched("cpu", cores)}
    if gpu:
        decode["gpu_batch"] = batched("cuda", 1)
        decode[f"gpu_batch_{cores}threads"] = batched("cuda", cores)
        if args.check_pixels:
            a = readers[0].read_batch(locs[0][:BATCH], 0, (CROP, CROP), "cpu")
            b = readers[0].read_batch(locs[0][:BATCH], 0, (CROP, CROP), "cuda").get()
            d = np.abs(a.astype(np.int16) - b)
            res["gpu_decode_vs_cpu"] = {"identical": bool(not d.any()), "max_abs_diff": int(d.max()),
                                        "values_differing": int(np.count_nonzero(d))}
    rates = res["decode_tiles_per_s"] = round_robin(decode, args.repeats)
    log("decode: " + ", ".join(f"{k} {max(v):,.0f}/s" for k, v in rates.items()))

    # --- batch math on one decoded batch
    from hpcfl.wsi.batch import BatchSpec, assemble

    spec = BatchSpec(INPUT, augment=True)
    tiles = readers[0].read_batch(locs[0][:BATCH], 0, (CROP, CROP))
    n = len(tiles)  # BATCH, or fewer on a small slide
    seeds = np.arange(n)
    k = max(1, args.math_batches)

    def host():
        for _ in range(k):
            assemble(np, tiles, seeds, spec)
        return k * n

    math = {"numpy": host}
    if gpu:
        import cupy as cp

        dev_tiles = cp.asarray(tiles)

        def on_device(upload: bool):
            def go():
                for _ in range(k):
                    assemble(cp, cp.asarray(tiles) if upload else dev_tiles, seeds, spec)
                cp.cuda.get_current_stream().synchronize()
                return k * n
            return go
        math["cupy"] = on_device(False)
        math["cupy_with_upload"] = on_device(True)
        err = float(np.abs(assemble(cp, dev_tiles, seeds, spec).get() - assemble(np, tiles, seeds, spec)).max())
        res["cupy_vs_numpy_max_abs_diff"] = err
    mrates = res["math_tiles_per_s"] = round_robin(math, args.repeats)
    log("batch math: " + ", ".join(f"{m} {max(v):,.0f}/s" for m, v in mrates.items()))

    # --- training fed by each path
    res["train_samples_per_s"] = train_feed(args, ix, gpu, log)
    return res


def train_feed(args, ix, gpu: bool, log) -> Dict[str, List[float]]:
    import torch

    from hpcfl.config import from_dict
    from hpcfl.model import build_model
    from hpcfl.wsi.batch import BatchSpec
    from hpcfl.wsi.dataset import TileDataset
    from hpcfl.wsi.feed import FeedPlan, prefetched

    device = torch.device("cuda" if gpu else "cpu")
    dev_index = torch.cuda.current_device() if gpu else -1
    cfg = from_dict({"sites": [{"name": "a"}], "model": {"name": "cnn", "conv_blocks": 3}})
    torch.manual_seed(0)
    model = build_model(cfg, 3 * INPUT * INPUT, len(ix.classes), (3, INPUT, INPUT)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    lossf = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng([args.seed, 3])
    order = rng.permutation(len(ix))[:args.train_samples]
    items = list(zip(order.tolist(), rng.integers(0, 2**31 - 1, len(order)).tolist()))
    spec = BatchSpec(INPUT, augment=True)
    bs = args.train_batch

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()

    def timed(batches) -> float:
        n, t0 = 0, None
        for x, y in batches:
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if t0 is None:
                if gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            else:
                n += len(y)
        if gpu:
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    def setup():
        if gpu:
            import cupy as cp

            cp.cuda.Device(dev_index).use()
            torch.cuda.set_device(dev_index)

    def feed(plan: FeedPlan):
        ds = TileDataset(ix, spec, "cucim", plan=plan)
        return lambda: prefetched((ds.batch(items[b:b + bs]) for b in range(0, len(items), bs)), 2, setup)

    host = TileDataset(ix, spec, "cucim", plan=FeedPlan("cpu", "numpy", gpu, dev_index))
    xs, ys = zip(*(host.batch(items[b:b + bs]) for b in range(0, len(items), bs)))
    X, Y = torch.cat(xs).to(device), torch.cat(ys).to(device)
    feeds: Dict[str, Callable[[], Any]] = {
        "in_memory": lambda: ((X[b:b + bs], Y[b:b + bs]) for b in range(0, len(Y), bs)),
        "cpu_decode_numpy_pinned": feed(FeedPlan("cpu", "numpy", gpu, dev_index)),
    }
    if gpu:
        feeds["cpu_decode_cupy"] = feed(FeedPlan("cpu", "cupy", False, dev_index))
        feeds["gpu_decode_cupy_dlpack"] = feed(FeedPlan("cuda", "cupy", False, dev_index))
    timed(feeds["in_memory"]())  # warm-up: cuDNN, allocator
    rates: Dict[str, List[float]] = {k: [] for k in feeds}
    for _ in range(args.repeats):
        for k, f in feeds.items():
            rates[k].append(timed(f()))
    log("training: " + ", ".join(f"{k} {max(v):,.0f}/s" for k, v in rates.items()))
    return rates


SECTIONS = [  # (result key, heading, unit, the row others are compared with, the GPU row missing without one)
    ("decode_tiles_per_s", "decode (224-px unaligned crops, cache off)", "tiles/s", "cpu_single", "gpu_batch"),
    ("math_tiles_per_s", "batch math (64 tiles 224 -> 64, flips/rotations, float CHW)", "tiles/s", "numpy", "cupy"),
    ("train_samples_per_s", "training the quickstart CNN, fed by", "samples/s", "in_memory", "gpu_decode_cupy_dlpack"),
]


def table(res: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for key, heading, unit, base, gpu_row in SECTIONS:
        rows = res[key]
        lines += ["" if lines else None, f"| {heading} | {unit} | vs {base} |", "|---|---:|---:|"]
        for k, v in rows.items():
            ratio = f"{max(v) / max(rows[base]):.2f}x" if max(rows[base]) else "-"  # nothing measured (tiny runs)
            lines.append(f"| {k} | {max(v):,.0f} | {ratio} |")
        if gpu_row not in rows:
            lines.append(f"| {gpu_row} | n/a (no GPU) | |")
    return [x for x in lines if x is not None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True, help="write the measurements here")
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096, help="slide side (a multiple of 256)")
    ap.add_argument("--tiles", type=int, default=1024, help="crops decoded per pass (over all slides)")
    ap.add_argument("--train-samples", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=BATCH)
    ap.add_argument("--math-batches", type=int, default=8, help="batches per batch-math pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the slides here (reused)")
    ap.add_argument("--no-check-pixels", dest="check_pixels", action="store_false",
                    help="skip comparing GPU-decoded pixels with CPU-decoded ones")
    ap.add_argument("--allow-cpu", action="store_true", help="without a GPU, measure the CPU columns anyway")
    args = ap.parse_args(argv)
    log = lambda msg: print(f"[gpu_tiles] {msg}", file=sys.stderr, flush=True)
    command = " ".join(["python bench/gpu_tiles.py"] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    state = gpu_state()
    if not (state["cuda_available"] and state["cupy_problem"] is None) and not args.allow_cpu:
        why = "torch sees no CUDA device" if not state["cuda_available"] else f"CuPy is not usable ({state['cupy_problem']})"
        print(f"gpu_tiles: no GPU: {why}; nothing measured (--allow-cpu measures the CPU columns)")
        args.json.write_text(json.dumps({"command": command, "gpu": False, "reason": why, "machine": state}, indent=1))
        return 0
    res = run(args, log)
    res["command"], res["wall_s"] = command, round(time.perf_counter() - t0, 1)
    m = res["machine"]
    print("# hpcfl GPU tile benchmark\n")
    print(f"command: `{command}`  ")
    print(f"machine: {m.get('device', 'no GPU')} ({m.get('memory_gib', '-')} GiB, sm {m.get('capability', '-')}), "
          f"{m['cpu_cores']} cores; python {m['python']}, torch {m['torch']} (CUDA {m.get('torch_cuda', '-')}), "
          f"cupy {m['cupy']}, cucim {m['cucim']}  ")
    print(f"data: {args.slides} synthetic JPEG slides of {args.size}^2 (256-px tiles, q90), {args.tiles} crops of "
          f"{CROP} px; best of {args.repeats} passes, round-robin" + ("" if res["gpu"] else "; NO GPU: CPU columns only")
          + "\n")
    if "gpu_decode_vs_cpu" in res:
        g = res["gpu_decode_vs_cpu"]
        print(f"GPU decode vs CPU decode on {BATCH} crops: " + ("identical pixels" if g["identical"] else
              f"max |diff| {g['max_abs_diff']}, {g['values_differing']} values differ") + "\n")
    for line in table(res):
        print(line)
    print(f"\nwall time {res['wall_s']:.0f} s")
    args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
