"""hpcfl: federated learning simulated at HPC scale, in one MPI job.

Public API::

    from hpcfl import load_config, launch
    cfg = load_config("configs/digits.yaml", ["fl.rounds=5"])
    launch(cfg, "configs/digits.yaml", ["fl.rounds=5"])   # runs mpirun, returns its exit code
    job = submit("configs/quickstart.yaml")                  # submitit: SLURM where it exists, else local
    job.result()

Pure building blocks: :func:`hpcfl.topology.build_topology`,
:mod:`hpcfl.aggregation` (FedAvg), :mod:`hpcfl.config`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, from_dict, load_config  # noqa: E402
from .errors import HpcflError  # noqa: E402


def launch(cfg, config_path, overrides=(), **kwargs) -> int:
    """Run the federation described by ``cfg`` (loaded from ``config_path``) under mpirun on this machine."""
    from .launch import launch as _launch

    return _launch(cfg, config_path, overrides, **kwargs)


def submit(config_path, overrides=(), executor="auto", folder=None):
    """Submit the federation with submitit (SLURM where it exists, else locally); returns the submitit Job."""
    from .cluster.submitit_api import submit as _submit

    return _submit(config_path, overrides, executor, folder)


__all__ = ["Config", "HpcflError", "from_dict", "launch", "load_config", "submit", "__version__"]
