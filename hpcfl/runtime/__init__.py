"""What every rank executes (``hpcfl run``), under any launcher.

- :mod:`.startup`: rank 0 resolves the config and prepares the run directory and the data; every rank opens
  its log, heartbeat and watchdog, pins itself, then imports torch and builds its slot;
- :mod:`.failure`: the failure contract (one line naming the rank, an error record, ``MPI_Abort``);
- :mod:`.main`: :func:`run_rank`, the rank's main.
"""
from __future__ import annotations

from .main import run_rank
from .startup import PIN_MODES, RankLaunch, plain, rank_info

__all__ = ["PIN_MODES", "RankLaunch", "plain", "rank_info", "run_rank"]
