"""``hpcfl launch`` of a config with a ``pipeline:`` section: the stages before its own federation.

configs/pathology.yaml is the MIL federation; its pipeline runs, in order,
``pretrain`` (the encoder's federation, e.g. configs/pathology-dino.yaml, whose
rank 0 synthesizes and tiles the slides when they are missing), ``features``
(``hpcfl features`` of that run into ``data.bags.dir``, on the pretrain
config's site ranks) and ``mil`` (this config). A stage whose run has finished
all its rounds is skipped, saying so; features already made by the same model
are skipped slide by slide and those of an older model replaced (the pipeline
owns its feature directory). ``--restart`` runs every stage again.
``--set pipeline.stages=[mil]`` runs one stage alone.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .config import Config, load_config
from .errors import ConfigError

STAGES = ("pretrain", "features", "mil")


def finished(cfg: Config, restart: bool) -> Optional[int]:
    """The last round of the run's newest checkpoint when it has done all ``fl.rounds`` (the run's config
    unchanged: a changed one is refused in one line, as a relaunch would), else None."""
    from .rundir import RunDir

    if restart:
        return None
    ckpt = RunDir(cfg).check()
    return int(ckpt["round"]) if ckpt and int(ckpt["round"]) >= cfg.fl.rounds else None


def _pretrain(cfg: Config, restart: bool, dry_run: bool, report: bool, out) -> int:
    from .launch import launch

    p = cfg.pipeline
    pcfg = load_config(p.pretrain, p.pretrain_set)
    done = finished(pcfg, restart)
    if done is not None:
        out.write(f"hpcfl: pipeline: pretrain: {pcfg.run.root}/{pcfg.run.name} finished round {done}; skipped\n")
        return 0
    out.write(f"hpcfl: pipeline: pretrain: {p.pretrain}\n")
    return launch(pcfg, p.pretrain, p.pretrain_set, restart=restart, dry_run=dry_run, report=report, stdout=out)


def _features(cfg: Config, dry_run: bool, out) -> int:
    from .features.extract import extract, features_under_mpirun
    from .rundir import RunPaths

    p = cfg.pipeline
    pcfg = load_config(p.pretrain, p.pretrain_set)
    run_dir = str(RunPaths.of(pcfg).path)
    tail = [run_dir, "--out", cfg.data.bags.dir, "--checkpoint", p.checkpoint, "--batch-size", str(p.batch_size),
            "--redo"]
    out.write(f"hpcfl: pipeline: features: hpcfl features {' '.join(tail)} --np {p.ranks}\n")
    out.flush()
    if dry_run:
        return 0
    rc = features_under_mpirun(run_dir, tail, p.ranks)
    if rc is None:
        extract(run_dir, cfg.data.bags.dir, None, p.checkpoint, p.batch_size, redo=True)
        rc = 0
    return rc


def run_pipeline(cfg: Config, config_path: str, overrides: Sequence[str] = (), restart: bool = False,
                 dry_run: bool = False, report: bool = True, stdout=None) -> int:
    """Every stage of ``cfg.pipeline.stages`` in order; the first that fails ends it (its exit code)."""
    from .launch import launch

    out = stdout or sys.stdout
    p = cfg.pipeline
    bad = [s for s in p.stages if s not in STAGES]
    if bad or not p.stages:
        raise ConfigError(f"{config_path}: pipeline.stages: {bad or '[]'} - choose from {', '.join(STAGES)}")
    if ("pretrain" in p.stages or "features" in p.stages) and not p.pretrain:
        raise ConfigError(f"{config_path}: pipeline.pretrain: the pretrain and features stages need the encoder's config")
    for stage in [s for s in STAGES if s in p.stages]:
        if stage == "pretrain":
            rc = _pretrain(cfg, restart, dry_run, report, out)
        elif stage == "features":
            rc = _features(cfg, dry_run, out)
        else:
            done = finished(cfg, restart)
            if done is not None:
                out.write(f"hpcfl: pipeline: mil: {cfg.run.root}/{cfg.run.name} finished round {done}; skipped "
                          "(--restart runs every stage again)\n")
                return 0
            out.write(f"hpcfl: pipeline: mil: {config_path}\n")
            rc = launch(cfg, config_path, overrides, restart=restart, dry_run=dry_run, report=report, stdout=out)
        if rc != 0:
            out.write(f"hpcfl: pipeline: stage {stage} failed (exit code {rc}); later stages not run\n")
            return rc
    return 0
