"""Was a killed rank killed for memory? The kernel's OOM killer and a cgroup's memory limit both end a rank
with SIGKILL, which mpirun reports like any other kill; the user needs the cause (a smaller batch, fewer ranks
per node, more memory). Counters read before the launch and after the failure tell:

- the memory cgroup the ranks run in (cgroup v2 ``memory.events``, v1 ``memory.oom_control``: ``oom_kill N``),
  with its limit (``memory.max`` / ``memory.limit_in_bytes``): what SLURM's ``--mem`` and systemd set;
- the whole machine's ``/proc/vmstat`` ``oom_kill``: the kernel ran out of memory.

Under SLURM, ``hpcfl status`` reads the job's state OUT_OF_MEMORY from sacct instead (hpcfl.cluster.slurm).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ADVICE = ("lower train.batch_size or the ranks per node (launch.slots, cluster.cores_per_rank), or give the job "
          "more memory (cluster.mem_per_node under SLURM)")
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryCgroup:
    dir: Path
    version: int  # 1 or 2

    def oom_kills(self) -> Optional[int]:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _counter(self.dir / name, "oom_kill")

    def limit(self) -> Optional[int]:
        """The memory limit in bytes, None when unlimited or unreadable."""
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        try:
            text = (self.dir / name).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and int(text) < _UNLIMITED else None


def _counter(path: Path, key: str) -> Optional[int]:
    try:
        m = re.search(rf"^{key}\s+(\d+)", Path(path).read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def memory_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) \
        -> Optional[MemoryCgroup]:
    """The memory cgroup this process runs in (v1 memory controller, else v2), or None."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # v1: "4:memory:/path"
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            d = root / "memory" / parts[2].lstrip("/")
            if (d / "memory.oom_control").exists():
                return MemoryCgroup(d, 1)
    for line in lines:  # v2: "0::/path", mounted at the root or at unified/ (hybrid)
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            for base in (root, root / "unified"):
                d = base / parts[2].lstrip("/")
                if (d / "memory.events").exists():
                    return MemoryCgroup(d, 2)
    return None


@dataclass(frozen=True)
class OomCounters:
    """OOM kills counted so far: in this process's memory cgroup and on the whole machine."""
    cgroup: Optional[MemoryCgroup]
    cgroup_kills: Optional[int]
    machine_kills: Optional[int]

    @classmethod
    def now(cls, vmstat: Path = Path("/proc/vmstat")) -> "OomCounters":
        cg = memory_cgroup()
        return cls(cg, cg.oom_kills() if cg else None, _counter(vmstat, "oom_kill"))


def killed_for_memory(before: OomCounters, after: OomCounters) -> Optional[str]:
    """Why the memory ran out, in words, when an OOM kill happened between ``before`` and ``after``; else None."""
    cg = after.cgroup
    if cg is not None and before.cgroup_kills is not None and (after.cgroup_kills or 0) > before.cgroup_kills:
        limit = cg.limit()
        said = f"its memory limit is {gib(limit)}" if limit else "its memory cgroup ran out"
        return f"{said} (cgroup {cg.dir})"
    if before.machine_kills is not None and (after.machine_kills or 0) > before.machine_kills:
        return "the kernel's out-of-memory killer ran: the machine ran out of memory"
    return None


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


__all__ = ["ADVICE", "MemoryCgroup", "OomCounters", "killed_for_memory", "memory_cgroup"]
