"""``hpcfl features RUN_DIR --out DIR``: a run's global model over every tile of every slide.

The encoder is the run's task's (:meth:`hpcfl.tasks.Task.encoder`: DINO's teacher
encoder, or any model up to its last linear layer), with the weights of its
``best.npz`` or last checkpoint. Work is split over the job's ranks as the run
split its slides: site k's slides (the run's partition of the tile index) are
cut into ``sites[k].ranks`` parts, and each (site, part) goes to one rank, so a
rank only reads the slides of the site(s) it stands for. Rank 0 first checks
every existing output: a slide whose file has the same model (weights
checksum), input size and tile count is skipped; one made by another model is
refused in one line (``--redo`` makes it again). Rank 0 writes
``features.json``: slides, tiles and tiles/s per rank and in all.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointError, HpcflError
from .store import MANIFEST, FeatureError, describe, feature_path, read_meta, verdict, weights_digest


@dataclass
class RunModel:
    """A run's config and the global weights the features come from."""

    run_dir: Path
    cfg: Any
    model: Dict[str, np.ndarray]
    round: int
    checkpoint: str
    digest: str


def load_run_model(run_dir, which: str = "best") -> RunModel:
    from ..checkpoint import latest_checkpoint, load_checkpoint, read_npz
    from ..config import load_config
    from ..rundir import RunPaths

    paths = RunPaths(run_dir)
    if not paths.config.exists():
        raise FeatureError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(paths.config)
    if which == "best":
        if not paths.best.exists():
            raise CheckpointError(f"{paths.best}: no best model yet (the run has not finished a round); "
                                  "use --checkpoint last or finish the run")
        meta, arrays = read_npz(paths.best)
        model = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
        path, rnd = paths.best, int(meta.get("round", 0))
    else:
        path = latest_checkpoint(paths.checkpoints)
        if path is None:
            raise CheckpointError(f"{paths.checkpoints}: no checkpoint yet")
        ckpt = load_checkpoint(path)
        model, rnd = ckpt["model"], int(ckpt["round"])
    return RunModel(Path(run_dir), cfg, model, rnd, str(path), weights_digest(model))


def build_encoder(rm: RunModel, num_classes: int, device: Any) -> Any:
    """The run's task's encoder with the run's weights, in evaluation mode on ``device``."""
    import torch

    from ..tasks import DataSpec, make_task

    cfg = rm.cfg
    size = cfg.data.tiles.input_size
    task = make_task(cfg)
    torch.manual_seed(cfg.run.seed)
    module = task.build_model(DataSpec((3, size, size), num_classes))
    state = module.state_dict()
    bad = [k for k, v in rm.model.items() if k not in state or tuple(state[k].shape) != v.shape]
    if bad:
        raise FeatureError(f"{rm.checkpoint}: its entries do not fit the model of {rm.run_dir}/config.yaml "
                           f"({', '.join(bad[:3])})")
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in rm.model.items()}, strict=False)
    enc = task.encoder(module).to(device)
    enc.eval()
    return enc


def assignments(cfg, index) -> List[Tuple[str, np.ndarray]]:
    """(site name, slide indices) per worker: each site's slides (the run's partition) cut into as many
    parts as the site has ranks."""
    from ..wsi.index import partition_slides, slide_partition

    k = len(cfg.sites)
    if cfg.data.name == "tiles":
        parts = slide_partition(index, cfg, k)
    else:  # a run on other data: its sites did not own these slides; deal them round-robin
        parts = partition_slides(len(index.slide_ids), k, "slide", cfg.run.seed, min_per_site=1)
    return [(s.name, parts[i][j::s.ranks]) for i, s in enumerate(cfg.sites) for j in range(s.ranks)]


def provenance(rm: RunModel, index_dir: Path, slide_id: str, tiles: int) -> Dict[str, Any]:
    return {"slide_id": slide_id, "run": str(rm.run_dir.resolve()), "round": rm.round, "checkpoint": rm.checkpoint,
            "weights_sha256": rm.digest, "encoder": rm.cfg.task, "input_size": rm.cfg.data.tiles.input_size,
            "index": str(index_dir.resolve()), "tiles": int(tiles)}


def plan(rm: RunModel, index, index_dir: Path, out: Path, redo: bool) -> List[Tuple[str, List[int]]]:
    """Rank 0: (site, slides to embed) per worker after checking every existing file; refuses another
    model's features unless ``redo``."""
    counts = np.bincount(index.slide, minlength=len(index.slide_ids))
    work = []
    for site, slides in assignments(rm.cfg, index):
        todo = []
        for s in slides.tolist():
            sid = index.slide_ids[s]
            path = feature_path(out, sid)
            meta = read_meta(path)
            v = verdict(meta, provenance(rm, index_dir, sid, counts[s]))
            if v == "other" and not redo:
                raise FeatureError(f"{path}: features of slide {sid} were made by another model ({describe(meta)}); "
                                   f"this run's weights are {rm.digest[:12]}: pass --redo to replace them, or "
                                   "choose another --out")
            if v != "done":
                todo.append(s)
        work.append((site, todo))
    return work


def embed_slide(enc, ds, index, slide: int, batch_size: int, device: Any, dtype: str) -> np.ndarray:
    import torch

    tiles = np.flatnonzero(index.slide == slide)
    out = []
    with torch.no_grad():
        for b in range(0, len(tiles), batch_size):
            x, _ = ds.batch([(int(i), 0) for i in tiles[b:b + batch_size]])
            out.append(enc(x.to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(dtype)


def write_slide(out: Path, index, slide: int, feats: np.ndarray, meta: Dict[str, Any], backend: str) -> None:
    from ..checkpoint import write_npz_atomic
    from ..wsi.readers import shared_reader

    tiles = np.flatnonzero(index.slide == slide)
    r = shared_reader(index.slide_paths[slide], backend)
    level = index.level[tiles]
    down = np.asarray([r.level_downsample(int(lv)) for lv in level], np.float64)
    w, h = r.level_dimensions(0)
    arrays = {"features": feats, "x": index.x[tiles], "y": index.y[tiles], "level": level,
              "size": index.size[tiles], "size0": np.round(index.size[tiles] * down).astype(np.int64)}
    write_npz_atomic(feature_path(out, index.slide_ids[slide]), arrays,
                     {**meta, "width": int(w), "height": int(h), "dim": int(feats.shape[1]),
                      "dtype": str(feats.dtype), "slide_path": index.slide_paths[slide]},
                     what=f"features of slide {index.slide_ids[slide]}")


def _comm():
    """The MPI world under a launcher; None otherwise (one process: no MPI initialisation at all)."""
    if not under_launcher():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _work(rm: RunModel, index, index_dir: Path, out: Path, mine, batch_size: int, dtype: str) -> Dict[str, Any]:
    """Embed this rank's slides; (slides, tiles, seconds) of the embedding."""
    import torch

    from ..wsi.batch import BatchSpec
    from ..wsi.dataset import TileDataset
    from ..wsi.feed import feed_plan

    t = rm.cfg.data.tiles
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    enc = build_encoder(rm, len(index.classes), device)
    ds = TileDataset(index, BatchSpec(t.input_size, False, 1, False), t.backend, t.batched_reads, feed_plan(rm.cfg))
    tiles, t0 = 0, time.perf_counter()
    for site, slides in mine:
        for s in slides:
            n = int((index.slide == s).sum())
            feats = embed_slide(enc, ds, index, s, batch_size, device, dtype)
            write_slide(out, index, s, feats, {**provenance(rm, index_dir, index.slide_ids[s], n), "site": site},
                        t.backend)
            tiles += n
    return {"slides": sum(len(s) for _, s in mine), "tiles": tiles, "seconds": time.perf_counter() - t0,
            "sites": sorted({site for site, s in mine if len(s)})}


def extract(run_dir, out_dir, index_dir: Optional[str] = None, checkpoint: str = "best", batch_size: int = 256,
            dtype: str = "float16", redo: bool = False) -> Optional[Dict[str, Any]]:
    """Every rank of the job (or this process alone) embeds its share; rank 0 returns the manifest."""
    from ..wsi.index import load_index

    comm = _comm()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    out = Path(out_dir)
    error, work, t_start = None, None, time.perf_counter()
    try:
        rm = load_run_model(run_dir, checkpoint)
        idx_dir = Path(index_dir or rm.cfg.data.tiles.index_dir)
        index = load_index(idx_dir, require_class=False)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            work = plan(rm, index, idx_dir, out, redo)
    except HpcflError as exc:
        error = str(exc)
    if comm is not None and size > 1:
        error = next((e for e in comm.allgather(error) if e is not None), None)
        if error is None:
            work = comm.bcast(work, root=0)
    if error is not None:  # every rank stops; rank 0 says why
        raise FeatureError(error) if rank == 0 else SystemExit(2)
    mine = [w for i, w in enumerate(work) if i % size == rank]
    try:
        stats: Dict[str, Any] = {"rank": rank, **_work(rm, index, idx_dir, out, mine, batch_size, dtype)}
    except HpcflError as exc:
        stats = {"rank": rank, "error": str(exc)}
    every = comm.gather(stats, root=0) if comm is not None and size > 1 else [stats]
    if rank != 0:
        return None
    failed = [s for s in every if "error" in s]
    if failed:
        raise FeatureError(f"rank {failed[0]['rank']}: {failed[0]['error']}")
    return _manifest(rm, idx_dir, out, every, len(index.slide_ids), time.perf_counter() - t_start)


def _manifest(rm: RunModel, idx_dir: Path, out: Path, every: Sequence[Dict[str, Any]], n_slides: int,
              wall: float) -> Dict[str, Any]:
    from ..atomic import write_atomic

    tiles = sum(s["tiles"] for s in every)
    busy = max((s["seconds"] for s in every), default=0.0)
    for s in every:
        s["tiles_per_s"] = s["tiles"] / s["seconds"] if s["seconds"] > 0 and s["tiles"] else None
    man = {"run": str(rm.run_dir.resolve()), "round": rm.round, "checkpoint": rm.checkpoint,
           "weights_sha256": rm.digest, "encoder": rm.cfg.task, "index": str(idx_dir.resolve()),
           "slides": n_slides, "slides_embedded": sum(s["slides"] for s in every), "tiles_embedded": tiles,
           "ranks": len(every), "embed_s": busy, "wall_s": wall,
           "tiles_per_s": tiles / busy if busy > 0 and tiles else None, "per_rank": list(every)}
    write_atomic(out / MANIFEST, json.dumps(man, indent=2) + "\n")
    return man


def under_launcher() -> bool:
    """Whether this process was started by mpirun/srun (then the job's ranks share the work)."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID",
                                         "HYDI_CONTROL_FD", "MPI_LOCALNRANKS"))


def mpirun_features(cfg, argv_tail: Sequence[str], n: int) -> List[str]:
    """The mpirun command that runs ``hpcfl features`` on ``n`` ranks of this machine."""
    from ..launch import mpirun_argv

    cores = len(os.sched_getaffinity(0))
    return mpirun_argv(cfg, [sys.executable, "-m", "hpcfl", "features", *argv_tail], cores=cores,
                       as_root=(os.geteuid() == 0), n=n)


def features_under_mpirun(run_dir, argv_tail: Sequence[str], n: int) -> Optional[int]:
    """Outside a launcher: run ``hpcfl features`` under mpirun on ``n`` ranks (0: the run's site ranks) and
    return its exit code; None when one process will do (n = 1, or no mpirun: then this process works alone)."""
    import shutil
    import subprocess

    from ..config import load_config
    from ..rundir import RunPaths

    paths = RunPaths(run_dir)
    if not paths.config.exists():
        raise FeatureError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(paths.config)
    n = n or sum(s.ranks for s in cfg.sites)
    if n <= 1 or shutil.which(cfg.launch.mpirun) is None:
        return None
    argv = mpirun_features(cfg, argv_tail, n)
    print(f"hpcfl: {' '.join(argv)}", flush=True)
    return subprocess.run(argv, check=False).returncode


__all__ = ["extract", "load_run_model", "build_encoder", "assignments", "plan", "under_launcher", "RunModel"]
