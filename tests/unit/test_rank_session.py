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
