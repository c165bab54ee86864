"""Launchers: how a federation's ranks are started.

- :mod:`.local`: ``hpcfl launch`` (and ``hpcfl.launch(...)``), the whole federation on this machine under mpirun;
- :mod:`.submitit`: ``hpcfl.submit(...)``, through submitit (SLURM where it exists, else locally).

The sbatch scripts of ``hpcfl render``/``hpcfl submit`` come from :mod:`hpcfl.cluster.render` and
:mod:`hpcfl.cluster.slurm`. This is the top layer (docs/architecture.md): it may import any module.
"""
from __future__ import annotations

from .local import choose_slots, describe_slots, failure_line, launch, local_capacity, mpirun_argv, rank_argv, resolve

__all__ = ["choose_slots", "describe_slots", "failure_line", "launch", "local_capacity", "mpirun_argv", "rank_argv",
           "resolve"]
