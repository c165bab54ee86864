"""hpcfl.comm.own_session: a rank launched by ``hpcfl launch`` leaves mpirun's session (Linux's autogroup scheduler
shares contended cores between sessions, so the ranks of one session together got one process's share)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpcfl.comm import SESSION_ENV, own_session

pytestmark = pytest.mark.unit

PROBE = ("import json, os; from hpcfl.comm import own_session; pgid = os.getpgid(0); moved = own_session(); "
         "print(json.dumps([moved, os.getpid(), os.getsid(0), os.getpgid(0), pgid]))")


def probe(env_value):
    """Run own_session in a child that, like an Open MPI rank, leads a process group of its own."""
    env = dict(os.environ)
    env.pop(SESSION_ENV, None)
    if env_value is not None:
        env[SESSION_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         process_group=0)
    return json.loads(out.stdout)


def test_a_group_leader_moves_to_a_session_and_group_of_its_own():
    moved, pid, sid, pgid, pgid_before = probe("own")
    assert pgid_before == pid  # the child led its own group, as Open MPI's ranks do
    assert moved and sid == pid and pgid == pid  # now it leads a session, and still its own group
    assert sid != os.getsid(0)


@pytest.mark.parametrize("value", [None, "keep"])
def test_without_the_launcher_asking_nothing_changes(value):
    moved, pid, sid, pgid, _ = probe(value)
    assert not moved and sid == os.getsid(0) and pgid == pid


def test_a_session_leader_stays(monkeypatch):
    monkeypatch.setenv(SESSION_ENV, "own")
    monkeypatch.setattr(os, "getsid", lambda pid: os.getpid())
    assert own_session() is False


class _FakeComm:
    """Records which broadcast a rank used; its non-blocking request completes on the second Test."""

    def __init__(self):
        self.calls = []

    def Bcast(self, buf, root=0):
        self.calls.append(("Bcast", root))

    def Ibcast(self, buf, root=0):
        self.calls.append(("Ibcast", root))
        comm = self

        class Req:
            tests = 0

            def Test(self):
                Req.tests += 1
                comm.calls.append(("Test", Req.tests))
                return Req.tests >= 2

        return Req()


def test_a_model_broadcast_waits_quietly_but_keeps_the_blocking_bcast_with_a_cuda_aware_mpi(monkeypatch):
    """Host buffers: Ibcast completed by polling (a spinning Bcast took the CPU from the ranks it waited for);
    a CUDA-aware MPI: the blocking Bcast (device buffers in non-blocking collectives are not documented)."""
    import numpy as np

    from hpcfl import comm as hcomm

    monkeypatch.setattr(hcomm, "_cuda_aware", lambda: False)
    fake = _FakeComm()
    hcomm.bcast_chunk(fake, np.zeros(4, np.float32), root=0)
    assert fake.calls == [("Ibcast", 0), ("Test", 1), ("Test", 2)]

    monkeypatch.setattr(hcomm, "_cuda_aware", lambda: True)
    fake = _FakeComm()
    hcomm.bcast_chunk(fake, np.zeros(4, np.float32), root=0)
    assert fake.calls == [("Bcast", 0)]
