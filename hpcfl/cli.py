"""The ``hpcfl`` command. Heavy imports (torch, MPI) happen only in the commands that need them."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

DESCRIPTION = """\
hpcfl: federated learning simulated inside one HPC job.
Rank 0 aggregates; the other ranks form sites that train data-parallel (Horovod).
`hpcfl COMMAND --help` describes a command.
"""


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the command, what is wrong, where to read more), not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable), e.g. --set fl.rounds=20 --set train.lr=1e-3")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue after the last complete round, failing if there is no checkpoint "
                        "(a relaunch into an existing run directory resumes anyway)")
    g.add_argument("--restart", action="store_true",
                   help="start over: the existing run directory is moved aside to <name>.old-<time>")


def _add_slurm_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slurm-timeout", type=float, metavar="SECONDS",
                   help="how long each SLURM command (squeue, sacct, scontrol, sbatch, scancel) may take before the "
                        "controller is taken for unreachable (exit code 3); default $HPCFL_SLURM_TIMEOUT_S or 10")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpcfl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("launch", help="run a federation on this machine under mpirun",
                       description="Build the mpirun command for this machine (one process per rank the config "
                                   "needs, --oversubscribe when ranks exceed cores, --allow-run-as-root as root), "
                                   "print it and run it. Progress goes to stdout; results to runs/<name>/.")
    _add_config_args(p)
    _add_run_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the mpirun command and exit")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end (hpcfl report)")

    p = sub.add_parser("run", help="the per-rank program (use under mpirun/srun/horovodrun)",
                       description="Executed by every rank. Rank 0 becomes the aggregator, the others the sites "
                                   "the config declares, in order. Example: mpirun -np 5 hpcfl run cfg.yaml")
    _add_config_args(p)
    _add_run_args(p)
    p.add_argument("--pin", choices=["none", "local", "cluster"], default=None,
                   help="pin this rank to its place's cores (and GPU) unless the launcher did: local = this machine "
                        "(hpcfl launch, oversubscribed), cluster = its place in the config's cluster section "
                        "(rendered jobs)")

    p = sub.add_parser("validate", help="check a config file",
                       description="Load and validate a config (with overrides); print the federation it describes.")
    _add_config_args(p)
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved config as YAML")

    p = sub.add_parser("render", help="print the sbatch script for the config's cluster section (dry run)",
                       description="Render the sbatch script that runs this federation on the cluster described by "
                                   "the config's `cluster:` section: whole nodes, every rank placed (aggregator on a "
                                   "few cores, a site's ranks kept on one node, one rank per GPU or socket), pinned. "
                                   "Fails in one line if the ranks cannot fit. Submit the output with sbatch.")
    _add_config_args(p)
    p.add_argument("--launcher", choices=["srun", "mpirun", "horovodrun"], help="default: cluster.launcher")
    p.add_argument("-o", "--output", help="write the script to this file instead of stdout")
    _add_slurm_timeout(p)

    p = sub.add_parser("submit", help="render the sbatch script and submit it",
                       description="Render the job (see `render`) into runs/<name>/slurm/, submit it with sbatch, "
                                   "record it in runs/<name>/slurm/jobs.json, print the job id and run directory.")
    _add_config_args(p)
    p.add_argument("--launcher", choices=["srun", "mpirun", "horovodrun"], help="default: cluster.launcher")
    _add_slurm_timeout(p)

    p = sub.add_parser("status", help="where a run stands: round, ETA, per-site metrics, live ranks, SLURM state",
                       description="A run directory (local or SLURM run) or a SLURM job id: the run's state, the round "
                                   "in progress and an ETA, every site's last metrics, which ranks are alive "
                                   "(heartbeats, else pids on this host), and a SLURM job's real state with its exit "
                                   "code and error line. Exits non-zero when there is nothing to report; 3 when SLURM's "
                                   "controller does not answer (a run directory's progress is still shown).")
    p.add_argument("target", help="a run directory or a SLURM job id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until the run ends or Ctrl-C")
    _add_slurm_timeout(p)

    p = sub.add_parser("report", help="one self-contained HTML report of one or more runs (plots, tables)",
                       description="Accuracy and loss per site per round (global and locally tuned models), the time "
                                   "breakdown per round, participation, the cross-site matrix, DP epsilon, rank "
                                   "placement and tiling thumbnails, in one HTML file with its images embedded (opens "
                                   "offline). Several runs are overlaid for comparison.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html of the first run)")

    p = sub.add_parser("cancel", help="cancel a job (JOBID, or RUN_DIR for its latest job)")
    p.add_argument("target")
    _add_slurm_timeout(p)

    p = sub.add_parser("stop", help="stop a running federation gracefully after the round in progress",
                       description="Ask a running federation (RUN_DIR, or a SLURM job id) to stop: rank 0 finishes "
                                   "the round in progress, writes a checkpoint and every rank exits cleanly. Run the "
                                   "same launch command again to resume. (A job's SLURM warning signal does the same, "
                                   "and then requeues the job.)")
    p.add_argument("target")
    _add_slurm_timeout(p)

    p = sub.add_parser("placement", help="print where every rank goes on the job's nodes",
                       description="Hostfile (one node per rank, for srun --distribution=arbitrary), Open MPI rankfile "
                                   "(node, socket and cores per rank) or horovodrun host list, from the config's "
                                   "placement and the job's node names.")
    _add_config_args(p)
    p.add_argument("--nodes-file", help="node names, one per line (default: from scontrol show hostnames)")
    p.add_argument("--format", choices=["hostfile", "rankfile", "hosts", "table"], default="table")

    p = sub.add_parser("synth-slides", help="write synthetic H&E-like pyramidal TIFF slides and their class masks",
                       description="Deterministic (seeded) JPEG-compressed tiled pyramidal TIFFs, each level its own "
                                   "page, with background and several tissue classes, plus <slide>.mask.png and "
                                   "slides.json. The demo and test data.")
    p.add_argument("out_dir")
    p.add_argument("--slides", type=int, default=8, help="number of slides (default 8)")
    p.add_argument("--size", type=int, default=4096, help="level-0 side in pixels (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hospitals", type=int, default=0,
                   help="> 0: slide labels (tumour focus or none) from this many hospitals with their own stain "
                        "shift and tumour share, written to labels.csv (slide_id,label,site)")
    p.add_argument("--pattern", choices=["focus", "atypia"], default="focus",
                   help="with --hospitals: what makes a slide tumour: a tumour focus (focus) or the nuclear atypia "
                        "of an epithelial focus every slide has, at matched colour (atypia)")

    p = sub.add_parser("tile", help="tile slides into a Feather index (one file per slide) with thumbnails",
                       description="Tissue detection (Otsu on HSV saturation at a low-resolution level), a tile grid, "
                                   "white_background/partial_tissue/tissue labels, classes from <slide>.mask.png or "
                                   "<slide>.geojson, one Feather file and one PNG thumbnail per slide. A bad slide is "
                                   "reported and skipped; the exit code is non-zero if any failed.")
    p.add_argument("slides_dir")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--level", type=int, default=0, help="pyramid level of the tiles (default 0)")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--stride", type=int, default=0, help="default: the tile size")
    p.add_argument("--backend", choices=["cucim", "openslide"], default="cucim")
    p.add_argument("--classes", default="", help="comma-separated class names for mask values 1, 2, ... "
                                                 "(default: from slides.json)")
    _add_features_parser(sub)
    return parser


def _add_features_parser(sub) -> None:
    p = sub.add_parser("features", help="a run's global model over every tile of every slide: one feature file per slide",
                       description="The run's encoder (DINO's teacher, or any task's model up to its last linear "
                                   "layer) with its best (or last) weights embeds every tissue tile of the index; "
                                   "each site's ranks embed only the site's slides. Slides whose file has the same "
                                   "model are skipped; another model's files are refused (--redo replaces them). "
                                   "Outside mpirun/srun it starts itself under mpirun on --np ranks.")
    p.add_argument("run_dir", help="run directory of the encoder's federation")
    p.add_argument("--out", required=True, help="feature directory (one <slide>.npz per slide, features.json)")
    p.add_argument("--index", default=None, help="tile index (default: the run's data.tiles.index_dir)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--batch-size", type=int, default=256, help="tiles per forward pass (default 256)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--redo", action="store_true", help="replace features made by another model")
    p.add_argument("--np", type=int, default=0, help="ranks (default: the run's site ranks; 1 = this process)")


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import HpcflError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    plain = {"run": _run, "synth-slides": _synth, "tile": _tile, "status": _status_or_cancel,
             "cancel": _status_or_cancel, "stop": _status_or_cancel, "report": _report, "features": _features}
    with_config = {"validate": _validate, "render": _render, "placement": _placement, "submit": _submit,
                   "launch": _launch}
    try:
        if hasattr(args, "slurm_timeout"):  # None: $HPCFL_SLURM_TIMEOUT_S or the default
            from .cluster.slurmcmd import set_deadline

            set_deadline(args.slurm_timeout)
        if args.command in plain:
            return plain[args.command](args)
        if args.command in with_config:
            cfg, overrides = _config_for(args)
            return with_config[args.command](cfg, overrides, args)
    except HpcflError as exc:
        print(f"hpcfl: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 3: SLURM's controller did not answer (hpcfl.cluster.slurmcmd)
    parser.error(f"unknown command {args.command}")
    return 2


def _synth(args) -> int:
    from .config import check_arg
    from .wsi.synth import synthesize_slides

    check_arg("synth-slides --slides", args.slides, "data.tiles.synthesize.slides")
    check_arg("synth-slides --size", args.size, "data.tiles.synthesize.size")
    check_arg("synth-slides --seed", args.seed, "data.tiles.synthesize.seed")
    _check_out_dir("synth-slides", args.out_dir)
    check_arg("synth-slides --hospitals", args.hospitals, "data.tiles.synthesize.hospitals")
    plan = None
    if args.hospitals:
        from .wsi.synth import LabelPlan

        plan = LabelPlan(args.hospitals, pattern=args.pattern)
    infos = synthesize_slides(args.out_dir, n_slides=args.slides, size=args.size, seed=args.seed, labels=plan)
    print(f"wrote {len(infos)} slides to {args.out_dir} (masks *.mask.png, slides.json"
          f"{', slide labels labels.csv' if plan else ''})")
    return 0


def _features(args) -> int:
    from .features.extract import extract, features_under_mpirun, under_launcher

    if args.batch_size < 1 or args.np < 0:
        raise _usage("features: --batch-size must be >= 1 and --np >= 0")
    if not under_launcher():
        rc = features_under_mpirun(args.run_dir, _features_tail(args), args.np)
        if rc is not None:
            return rc
    man = extract(args.run_dir, args.out, args.index, args.checkpoint, args.batch_size, args.dtype, args.redo)
    if man is not None:
        rate = man["tiles_per_s"]
        print(f"features: {man['slides_embedded']} of {man['slides']} slides embedded ({man['tiles_embedded']} tiles"
              f"{f', {rate:.0f} tiles/s' if rate else ''}) on {man['ranks']} rank(s), "
              f"{man['slides'] - man['slides_embedded']} already done by this model; {args.out} (features.json)")
    return 0


def _features_tail(args) -> List[str]:
    tail = [args.run_dir, "--out", args.out, "--checkpoint", args.checkpoint, "--batch-size", str(args.batch_size),
            "--dtype", args.dtype]
    return tail + (["--index", args.index] if args.index else []) + (["--redo"] if args.redo else [])


def _usage(message: str):
    from .errors import ConfigError

    return ConfigError(message)


def _report(args) -> int:
    from .observe import write_report

    print(f"report: {write_report(*args.run_dirs, output=args.output)}")
    return 0


def _config_for(args):
    """The config of a command that takes one (file arguments checked first), and the overrides it passes on:
    render and submit add the node shape they read from SLURM when the config leaves it out."""
    from .config import load_config

    if args.command == "render" and args.output:
        _check_out_file("render -o", args.output)
    if args.command == "placement" and args.nodes_file:
        _check_in_file("placement --nodes-file", args.nodes_file)
    if args.command == "submit":
        _need_slurm("sbatch")
    cfg = load_config(args.config, args.overrides)
    overrides = list(args.overrides)
    if args.command in ("render", "submit"):
        from .cluster.nodecheck import check_fit, fill_node_shape, read_nodes

        # submit: SLURM must answer (ControllerUnreachable otherwise), and the nodes must fit the cluster section
        nodes = read_nodes() if args.command == "submit" else None
        cfg, overrides, line = fill_node_shape(cfg, overrides, nodes=nodes)
        if line:
            print(f"hpcfl: {line}", file=sys.stderr)
        if nodes is not None and nodes[0] is not None:
            check_fit(cfg, nodes[0])
    return cfg, overrides


def _validate(cfg, overrides, args) -> int:
    from .config import dump_yaml
    from .topology import expected_layout

    print(f"ok: {args.config}: {expected_layout([(s.name, s.ranks) for s in cfg.sites])}; "
          f"{cfg.fl.rounds} rounds; run directory {cfg.run.root}/{cfg.run.name}")
    if args.show:
        print(dump_yaml(cfg), end="")
    return 0


def _render(cfg, overrides, args) -> int:
    from .cluster.render import render_sbatch

    text = render_sbatch(cfg, args.config, overrides, args.launcher)
    _say_slots(cfg)
    if args.output:
        from .atomic import write_atomic

        write_atomic(args.output, text)
        print(f"wrote {args.output}; submit it with: sbatch {args.output}")
    else:
        print(text, end="")
    return 0


def _submit(cfg, overrides, args) -> int:
    from .cluster.slurm import submit

    _say_slots(cfg)
    job = submit(cfg, args.config, overrides, args.launcher)
    print(f"submitted job {job['job_id']}; results in {job['run_dir']} (job log {job['log']}); "
          f"follow it with: hpcfl status {job['run_dir']}")
    return 0


def _launch(cfg, overrides, args) -> int:
    from .launch import launch

    if cfg.pipeline is not None:
        from .pipeline import run_pipeline

        return run_pipeline(cfg, args.config, args.overrides, restart=args.restart, dry_run=args.dry_run,
                            report=not args.no_report)

    return launch(cfg, args.config, args.overrides, resume=args.resume, restart=args.restart,
                  dry_run=args.dry_run, report=not args.no_report)


def _status_or_cancel(args) -> int:
    """status / stop / cancel of a run directory or a SLURM job id (hpcfl.observe.status, hpcfl.cluster.slurm)."""
    import json
    import math

    from .cluster import slurm
    from .errors import LaunchError
    from .observe import status as S
    from .rundir import RunPaths

    run_dir, job_id = _resolve_target(args.target)
    if args.command == "stop":
        return _stop(args.target, run_dir, job_id)
    if args.command == "cancel":
        if job_id is None:
            raise LaunchError(f"{args.target}: no SLURM job recorded ({RunPaths(run_dir).slurm_jobs}); "
                              f"a local run is stopped with: hpcfl stop {args.target}")
        slurm.cancel(job_id)
        print(f"cancelled job {job_id}")
        return 0
    if args.watch is not None:
        if not (math.isfinite(args.watch) and args.watch > 0):
            raise LaunchError(f"status --watch: {args.watch} is not a positive number of seconds")
        return S.watch(run_dir, job_id, args.watch, as_json=args.json)
    lines, doc, _ = S.collect(run_dir, job_id)
    print(json.dumps(doc, indent=2) if args.json else "\n".join(lines))
    return slurm.ControllerUnreachable.exit_code if (doc.get("job") or {}).get("unreachable") else 0


def _resolve_target(target: str):
    """(run directory or None, SLURM job id or None) of a RUN_DIR or JOBID argument; one line if it is neither."""
    import re

    from .cluster import slurm
    from .errors import LaunchError

    p = Path(target)
    if p.is_dir():
        jobs = slurm.recorded_jobs(p)
        return p, (jobs[-1] if jobs else None)
    if re.fullmatch(r"\d+", target):
        slurm.require_client("squeue")  # "no SLURM client here: squeue not found" before anything else
        return slurm.run_dir_of_job(target), target
    if p.exists():
        raise LaunchError(f"{target}: not a directory (a run directory or a SLURM job id expected)")
    raise LaunchError(f"{target}: no such run directory, and not a SLURM job id")


def _stop(target: str, run_dir, job_id) -> int:
    """Ask a running federation to stop after the round in progress; refuse when nothing is running."""
    from .errors import LaunchError
    from .observe.status import run_status
    from .rundir import RunPaths

    if run_dir is None:
        raise LaunchError(f"job {job_id}: its run directory is unknown (not submitted by hpcfl submit, "
                          "or SLURM no longer knows the job)")
    paths = RunPaths(run_dir)
    if not paths.manifest.exists() and not paths.config.exists():
        raise LaunchError(f"{target}: not the run directory of a started federation (no manifest.json)")
    st = run_status(Path(run_dir))
    if st.state in ("finished", "stopped"):
        raise LaunchError(f"{run_dir}: the run has already {st.state} (round {st.last_round}); nothing to stop")
    if not st.active:
        raise LaunchError(f"{run_dir}: not running ({st.state} after round {st.last_round}); nothing to stop")
    paths.stop_file.touch()
    print(f"asked {run_dir} to stop: rank 0 checkpoints after the round in progress, then every rank exits")
    return 0


def _say_slots(cfg) -> None:
    """On stderr: how many slots the cluster section gives the sites (what render chose), and a warning
    for each path a multi-node job needs that is usually node-local."""
    from .cluster.render import cluster_slots, node_local_paths

    k, s = len(cfg.sites), cluster_slots(cfg)
    how = "one per site" if s == k else f"each trains {k // s}-{-(-k // s)} sites in turn; launch.slots sets it"
    print(f"hpcfl: {k} site(s) on {s} slot(s) ({how})", file=sys.stderr)
    for what in node_local_paths(cfg):
        print(f"hpcfl: warning: {what} is in a folder that is usually node-local: ranks on the job's other "
              f"{cfg.cluster.nodes - 1} node(s) will not find it; use a shared filesystem", file=sys.stderr)


def _say_transports(cfg) -> None:
    """After the placement table on GPU nodes: the transport each slot's group will use, and why."""
    from .cluster.render import cluster_places, cluster_shape, cluster_slots, slot_groups
    from .site.layout import planned_transports

    if not cluster_shape(cfg).gpus_per_node:
        return
    sizes = [n for _, n in slot_groups(cfg, cluster_slots(cfg))]
    for i, t in enumerate(planned_transports(cluster_places(cfg), sizes)):
        if len(t.ranks) > 1:
            use = "refused (Horovod needs NCCL)" if cfg.site.backend == "horovod" and t.shared else t.transport
            print(f"slot {i} (ranks {t.ranks[0] + 1}-{t.ranks[-1] + 1}): {use}, {t.reason}")


def _placement(cfg, overrides, args) -> int:
    import subprocess

    from .cluster.render import cluster_places, placement_text
    from .errors import LaunchError

    if args.format == "table":
        _say_slots(cfg)
        print("rank  node  socket  cores           gpu")
        for p in cluster_places(cfg):
            cores = f"{p.cores[0]}-{p.cores[-1]}" if p.cores else "-"
            print(f"{p.rank:>4}  {p.node:>4}  {p.socket:>6}  {cores:<15} {'-' if p.gpu is None else p.gpu}")
        _say_transports(cfg)
        return 0
    if args.nodes_file:
        names = _read_text("placement --nodes-file", args.nodes_file).split()
        if not names:
            raise LaunchError(f"placement --nodes-file {args.nodes_file}: no node names in it (one per line)")
    else:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise LaunchError("placement: not inside a SLURM job (SLURM_JOB_NODELIST is unset); "
                              "name the nodes with --nodes-file FILE")
        _need_slurm("scontrol")
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines() or [f"exit code {r.returncode}"]
            raise LaunchError(f"placement: scontrol show hostnames {nodelist} failed: {why[-1]}")
        names = r.stdout.split()
    text = placement_text(cfg, names, args.format)
    if os.environ.get("SLURM_JOB_ID"):  # the job's placement step: the node must give what the ranks will ask
        from .cluster.nodecheck import check_node, node_facts

        check_node(cfg.cluster, node_facts())
    print(text, end="")
    return 0


# -- argument checks: every file and folder a command is given, before it is used ------------------


def _need_slurm(tool: str) -> None:
    import shutil

    from .errors import LaunchError

    if shutil.which(tool) is None:
        raise LaunchError(f"no SLURM client here: {tool} not found (install slurm-wlm, or run this on the cluster)")


def _check_out_file(label: str, path: str) -> None:
    """An output file: its folder must exist, and it must not be a folder."""
    from .errors import HpcflError

    p = Path(path)
    if p.is_dir():
        raise HpcflError(f"{label} {path}: is a folder; name a file")
    if not p.parent.is_dir():
        raise HpcflError(f"{label} {path}: the folder {p.parent} does not exist")


def _check_out_dir(label: str, path: str) -> None:
    """An output folder: it may not exist yet, but it must not be a file, nor under one."""
    from .errors import HpcflError

    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise HpcflError(f"{label} {path}: {q} is a file, not a folder")
        if q.exists():
            break


def _check_in_file(label: str, path: str) -> None:
    from .errors import HpcflError

    p = Path(path)
    if not p.exists():
        raise HpcflError(f"{label} {path}: no such file")
    if p.is_dir():
        raise HpcflError(f"{label} {path}: is a folder, not a file")


def _read_text(label: str, path: str) -> str:
    from .errors import HpcflError

    _check_in_file(label, path)
    try:
        return Path(path).read_bytes().decode()
    except OSError as exc:
        raise HpcflError(f"{label} {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise HpcflError(f"{label} {path}: not a text file (not UTF-8)") from None


def _launcher_rank() -> int:
    """This process's rank as the launcher set it (before MPI starts); 0 when not under a launcher."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "HOROVOD_RANK"):
        if os.environ.get(var, "").isdecimal():
            return int(os.environ[var])
    return 0


def _run(args) -> int:
    """`hpcfl run`: a bad config is reported before MPI starts, once (by rank 0), in one line. Every rank
    checks it (so none is left waiting for a rank 0 that exited: srun does not end the others); the run itself
    uses the config as rank 0 resolved it."""
    from .config import load_config
    from .errors import HpcflError

    try:
        load_config(args.config, args.overrides)
    except HpcflError as exc:
        if _launcher_rank() == 0:
            print(f"hpcfl: {exc}", file=sys.stderr)
        return 2
    from .runtime import run_rank

    return run_rank(args.config, args.overrides, resume=args.resume, restart=args.restart, pin=args.pin)


def _tile(args) -> int:
    from .config import check_arg
    from .errors import HpcflError
    from .wsi.tiling import SLIDE_SUFFIXES, TilingParams, list_slides, tile_directory

    check_arg("tile --level", args.level, "data.tiles.level")
    check_arg("tile --tile-size", args.tile_size, "data.tiles.tile_size")
    check_arg("tile --stride", args.stride, "data.tiles.stride")
    _check_out_dir("tile --out", args.out)
    if not list_slides(args.slides_dir):  # a missing folder: "slides directory not found"
        raise HpcflError(f"tile {args.slides_dir}: no slides in this folder (looked for {', '.join(SLIDE_SUFFIXES)})")
    params = TilingParams(level=args.level, tile_size=args.tile_size, stride=args.stride or args.tile_size,
                          backend=args.backend)
    classes = [c for c in args.classes.split(",") if c]
    done, failures = tile_directory(args.slides_dir, args.out, params, classes)
    for s in done:
        print(f"{s['slide_id']}: {s['tiles']} tiles ({s['tissue']} tissue, {s['partial_tissue']} partial, "
              f"{s['white_background']} background)")
    for f in failures:
        print(f"hpcfl: {f}", file=sys.stderr)
    print(f"index: {args.out} ({len(done)} slides tiled, {len(failures)} failed)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
