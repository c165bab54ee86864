"""hpcfl: federated learning simulated at HPC scale, in one MPI job.

Public API::

    import dataclasses
    from hpcfl import load_config, launch
    launch("configs/digits.yaml", ["fl.rounds=5"])         # runs mpirun, returns its exit code
    cfg = load_config("configs/digits.yaml")               # a typed, frozen Config
    launch(cfg, ["train.lr=0.05", "run.name=lr0.05"])      # a Config object (or a dict), with overrides
    launch(dataclasses.replace(cfg, task_args={}))         # built or changed in Python: no file needed
    job = submit("configs/quickstart.yaml")                  # submitit: SLURM where it exists, else local
    job.result()

Pure building blocks: :func:`hpcfl.topology.build_topology`,
:mod:`hpcfl.aggregation` (FedAvg), :mod:`hpcfl.config`.
"""
from __future__ import annotations

__version__ = "0.1.0"

import os  # noqa: E402

from .config import Config, from_dict, load_config  # noqa: E402
from .errors import HpcflError  # noqa: E402

# The submodule hpcfl.launch is loaded here, before the function of the same name is defined below: loading it
# later would rebind hpcfl.launch to the module, and the documented hpcfl.launch(...) would stop being callable.
from . import launch as _launch_module  # noqa: E402,F401


def launch(config, overrides=(), *args, **kwargs) -> int:
    """Run a federation on this machine under mpirun; returns its exit code.

    ``config`` is a YAML path, a :class:`Config` or a dict in the YAML's shape; ``overrides`` are ``key=value``
    strings on top (what ``--set`` takes). A config that is not a file is written to the run directory
    (``launch-config.yaml``) for the ranks to read. Keywords: resume, restart, dry_run, stdout, report.
    The older form ``launch(cfg, config_path, overrides)`` (a Config loaded from that file) still works."""
    from .launch import launch as _launch
    from .launch import resolve

    if isinstance(overrides, (str, os.PathLike)):  # launch(cfg, config_path, overrides): the file is the config
        config, overrides = overrides, (args[0] if args else kwargs.pop("overrides", ()))
        args = args[1:]
    cfg, path, rank_overrides = resolve(config, overrides)
    return _launch(cfg, path, rank_overrides, *args, **kwargs)


def submit(config_path, overrides=(), executor="auto", folder=None):
    """Submit the federation with submitit (SLURM where it exists, else locally); returns the submitit Job."""
    from .launch.submitit import submit as _submit

    return _submit(config_path, overrides, executor, folder)


__all__ = ["Config", "HpcflError", "from_dict", "launch", "load_config", "submit", "__version__"]
