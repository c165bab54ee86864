"""The ``hpcfl`` command. Heavy imports (torch, MPI) happen only in the commands that need them."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DESCRIPTION = """\
hpcfl: federated learning simulated inside one HPC job.
Rank 0 aggregates; the other ranks form sites that train data-parallel (Horovod).

commands:
  launch    run a federation on this machine: builds and runs the mpirun command
  run       what each rank executes, under any launcher (mpirun, srun, horovodrun)
  validate  check a config file (and --set overrides) without running anything
"""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcfl", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("launch", help="run a federation on this machine under mpirun",
                       description="Build the mpirun command for this machine (one process per rank the config "
                                   "needs, --oversubscribe when ranks exceed cores, --allow-run-as-root as root), "
                                   "print it and run it. Progress goes to stdout; results to runs/<name>/.")
    _add_config_args(p)
    _add_run_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the mpirun command and exit")

    p = sub.add_parser("run", help="the per-rank program (use under mpirun/srun/horovodrun)",
                       description="Executed by every rank. Rank 0 becomes the aggregator, the others the sites "
                                   "the config declares, in order. Example: mpirun -np 5 hpcfl run cfg.yaml")
    _add_config_args(p)
    _add_run_args(p)

    p = sub.add_parser("validate", help="check a config file",
                       description="Load and validate a config (with overrides); print the federation it describes.")
    _add_config_args(p)
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved config as YAML")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import HpcflError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            from .runtime import run_rank

            return run_rank(args.config, args.overrides, resume=args.resume, restart=args.restart)

        from .config import dump_yaml, load_config
        from .topology import expected_layout

        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(f"ok: {args.config}: {expected_layout([(s.name, s.ranks) for s in cfg.sites])}; "
                  f"{cfg.fl.rounds} rounds; run directory {cfg.run.root}/{cfg.run.name}")
            if args.show:
                print(dump_yaml(cfg), end="")
            return 0
        if args.command == "launch":
            from .launch import launch

            return launch(cfg, args.config, args.overrides, resume=args.resume, restart=args.restart,
                          dry_run=args.dry_run)
    except HpcflError as exc:
        print(f"hpcfl: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
