"""The failure contract: an exception on any rank is logged with its traceback to ``logs/rank-NNNN.log``, recorded
in ``logs/rank-NNNN.error.json``, printed as ONE line naming the rank and its site, and then the rank calls
``MPI_Abort`` so the whole job ends within seconds instead of the other ranks waiting forever in their
collectives. A rank that hangs instead is caught by the watchdog (:mod:`hpcfl.watchdog`).
"""
from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any, Dict

from ..errors import ConfigError, HpcflError, TopologyError

log = logging.getLogger("hpcfl")
ABORT_GRACE_S = 1.0


def fail(world, rank: int, exc: BaseException, state: Dict[str, Any]) -> None:
    role = state["role"]
    who = role.describe() if role is not None else f"rank {rank}"
    what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, HpcflError) else str(exc)
    line = f"hpcfl: {who} failed: {what}"
    tb = traceback.format_exc()
    if log.handlers:
        log.error("%s\n%s", line, tb, extra={"console": False})  # the console gets the line once, below
    rundir = state["rundir"]
    if rundir is not None and rundir.logs.is_dir():
        from ..atomic import write_atomic

        try:
            write_atomic(rundir.error_path(rank), json.dumps({
                "rank": rank, "role": role.kind if role else None,
                "site": role.names[0] if role and len(role.names) == 1 else None,
                "error": what, "type": type(exc).__name__, "line": line, "time": time.time(), "traceback": tb,
            }))
        except HpcflError:  # best effort: the log and the stderr line still report the failure
            pass
    if state.get("beat") is not None:
        state["beat"].stop("failed")
    if rank == 0 and rundir is not None:
        rundir.release_lock()
    # Errors every rank sees identically (a bad config, a wrong rank count) are reported once, by rank 0;
    # a node that cannot give a rank its place is seen by the ranks on that node only.
    from ..cluster.nodecheck import NodeMismatch

    same_everywhere = (isinstance(exc, (ConfigError, TopologyError)) and not isinstance(exc, NodeMismatch)
                       and not state["started"])
    if rank == 0 or not same_everywhere:
        sys.stderr.write(line + "\n")
        if not isinstance(exc, HpcflError):
            sys.stderr.write(f"hpcfl: traceback in {rundir.log_path(rank) if rundir else 'the rank log'}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    logging.shutdown()
    if world.Get_size() > 1:
        time.sleep(ABORT_GRACE_S)  # let mpirun forward our line before it tears the job down
        world.Abort(1)
    sys.exit(1)
