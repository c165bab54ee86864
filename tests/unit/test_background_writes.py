"""Rank 0 writes best.npz and checkpoints in the background (hpcfl.protocol.server.Aggregator.start_writes)."""
import threading
import time

import pytest

from hpcfl.errors import CheckpointError
from hpcfl.protocol.server import Aggregator

pytestmark = pytest.mark.unit


def bare():
    agg = Aggregator.__new__(Aggregator)  # only the writer's state: no MPI, no config
    agg._pending, agg._writer, agg._write_error = [], None, None
    return agg


def test_a_rounds_writes_run_in_order_off_the_main_thread_after_the_round_befores():
    agg, seen = bare(), []

    def write(tag, delay=0.0):
        def w():
            time.sleep(delay)
            seen.append((tag, threading.current_thread() is threading.main_thread()))
        return w

    agg._pending += [write("best r1", 0.2), write("checkpoint r1")]
    agg.start_writes()
    assert seen == []  # returned at once: the writes overlap what rank 0 does next
    agg._pending.append(write("best r2"))
    agg.start_writes()  # waits for round 1's writes first
    agg.wait_for_writes()
    assert seen == [("best r1", False), ("checkpoint r1", False), ("best r2", False)]
    agg.start_writes()  # nothing pending: nothing started
    assert agg._writer is None


def test_a_failed_write_is_raised_in_rank_0s_thread_once():
    agg = bare()

    def full_disk():
        raise CheckpointError("runs/x/checkpoints: no space left on device")

    agg._pending.append(full_disk)
    agg.start_writes()
    with pytest.raises(CheckpointError, match="no space left"):
        agg.wait_for_writes()
    agg.wait_for_writes()  # reported once
