#!/usr/bin/env python
"""A model's broadcast and Reduce between 3 ranks, blocking against waited quietly, with each rank's CPU time.

What hpcfl.comm.bcast_chunk is measured by (docs/benchmarks.md section 12.7): on shared cores a rank that
spins in a blocking collective takes the CPU from the ranks it waits for. Run under mpirun, once per mode:

    mpirun -np 3 --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 .venv/bin/python bench/mpi_collectives.py 10 block
    mpirun -np 3 --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 .venv/bin/python bench/mpi_collectives.py 10 quiet

(millions of float32 values; block: Bcast / Reduce; quiet: Ibcast / Ireduce completed by hpcfl.comm.wait_quietly;
8 MB chunks as hpcfl sends them). Prints, for each collective, the median wall ms of 10 and the CPU ms per call
of every rank.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpcfl.comm import wait_quietly  # noqa: E402
from hpcfl.device import chunks  # noqa: E402


def main() -> None:
    comm, n, mode = MPI.COMM_WORLD, int(float(sys.argv[1]) * 1e6), sys.argv[2]
    rank, reps = comm.Get_rank(), 10
    buf, acc = np.ones(n, np.float32), np.zeros(n, np.float32)
    steps = list(chunks(n, 4, 8))

    def bcast() -> None:
        for s, e in steps:
            if mode == "block":
                comm.Bcast(buf[s:e], root=0)
            else:
                wait_quietly(comm.Ibcast(buf[s:e], root=0))

    def reduce() -> None:
        for s, e in steps:
            send = MPI.IN_PLACE if rank == 0 else buf[s:e]
            recv = acc[s:e] if rank == 0 else None
            if mode == "block":
                comm.Reduce(send, recv, op=MPI.SUM, root=0)
            else:
                wait_quietly(comm.Ireduce(send, recv, op=MPI.SUM, root=0))

    for name, op in (("bcast", bcast), ("reduce", reduce)):
        walls, cpu0 = [], time.process_time()
        for _ in range(reps):
            wait_quietly(comm.Ibarrier())
            t = time.perf_counter()
            op()
            walls.append(time.perf_counter() - t)
        got = comm.gather((float(np.median(walls)), (time.process_time() - cpu0) / reps), root=0)
        if rank == 0:
            print(f"{mode:<6} {name:<7} wall ms per rank {[round(1e3 * w, 1) for w, _ in got]}  "
                  f"CPU ms per call {[round(1e3 * c, 1) for _, c in got]}", flush=True)


if __name__ == "__main__":
    main()
