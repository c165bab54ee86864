"""Rank 0 writes best.npz and checkpoints in the background (hpcfl.protocol.server.BackgroundWrites)."""
import threading
import time

import pytest

from hpcfl.errors import CheckpointError
from hpcfl.protocol.server import BackgroundWrites

pytestmark = pytest.mark.unit


def bare():
    return BackgroundWrites()


def test_a_rounds_writes_run_in_order_off_the_main_thread_after_the_round_befores():
    agg, seen = bare(), []

    def write(tag, delay=0.0):
        def w():
            time.sleep(delay)
            seen.append((tag, threading.current_thread() is threading.main_thread()))
        return w

    agg.pending += [write("best r1", 0.2), write("checkpoint r1")]
    agg.start()
    assert seen == []  # returned at once: the writes overlap what rank 0 does next
    agg.pending.append(write("best r2"))
    agg.start()  # waits for round 1's writes first
    agg.wait()
    assert seen == [("best r1", False), ("checkpoint r1", False), ("best r2", False)]
    agg.start()  # nothing pending: nothing started
    assert not agg.running


def test_a_failed_write_is_raised_in_rank_0s_thread_once():
    agg = bare()

    def full_disk():
        raise CheckpointError("runs/x/checkpoints: no space left on device")

    agg.pending.append(full_disk)
    agg.start()
    with pytest.raises(CheckpointError, match="no space left"):
        agg.wait()
    agg.wait()  # reported once
