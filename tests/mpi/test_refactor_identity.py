"""The round protocol's refactor (protocol/, site slots, flat optimizer) kept training bit-identical.

tests/golden/final-weights.json holds fingerprints of the final global weights that the code BEFORE the
refactor produced (commit 5ab37c6) for configs/ with a few strategies and privacy options; the same runs
now must give the same bits, with one slot per site and with the slots this machine picks.
"""
import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from weights_fingerprint import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("need_mpirun")
GOLDEN = json.loads((ROOT / "tests" / "golden" / "final-weights.json").read_text())["runs"]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: " ".join([c["config"].split("/")[-1], *c["set"]]))
def test_final_weights_are_those_of_the_code_before_the_refactor(case):
    got = run(case["config"], case["set"], ROOT)
    assert got["sha256"] == case["sha256"], f"{case['config']} {case['set']}: the trajectory changed"
