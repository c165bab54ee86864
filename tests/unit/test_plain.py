"""runtime.plain: what the ranks send rank 0 unpickles without importing torch."""
import pickle

import pytest

from hpcfl.runtime import plain

pytestmark = pytest.mark.unit


class Version(str):
    """Stands in for torch's TorchVersion, a str subclass that unpickles by importing its module."""


class Count(int):
    pass


def test_subclasses_of_plain_types_become_plain_and_the_structure_stays():
    x = {"versions": {"torch": Version("2.13.0")}, "n": Count(3), "ok": True, "none": None,
         "affinity": (0, Count(1)), "laps": [1.5, {"k": Version("v")}]}
    out = plain(x)
    assert out == x
    assert type(out["versions"]["torch"]) is str and type(out["n"]) is int and out["ok"] is True
    assert type(out["affinity"]) is tuple and type(out["affinity"][1]) is int
    assert type(out["laps"][1]["k"]) is str
    # the pickle names no class of ours (or torch's): rank 0 imports nothing to read it
    assert b"Version" in pickle.dumps(x) and b"Version" not in pickle.dumps(out)
    assert b"Count" not in pickle.dumps(out)
