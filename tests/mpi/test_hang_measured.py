"""A rank stopped in a fast job is found once the rounds are known: the automatic hang timeout follows the
measured rounds (five times the slowest after the first, at least fault.hang_min_s = 60 s) instead of the
300 s floor that start-up and the first round keep (found after 303 s before)."""
import json

import pytest
from conftest import hpcfl

pytestmark = pytest.mark.usefixtures("need_mpirun")


def test_a_stopped_rank_in_a_fast_job_is_found_without_waiting_for_the_floor(tmp_path):
    # no fault.hang_timeout_s: the automatic one. The job must end well before the 300 s floor would
    # (the subprocess deadline below fails the test otherwise); how much sooner is not asserted
    r = hpcfl("launch", "configs/digits-2x2.yaml", "--set", f"run.root={tmp_path}", "--set", "run.name=fast",
              "--set", "fl.rounds=60", "--set", "fl.local_steps=2", "--set", "train.batch_size=16",
              "--set", "launch.slots=2", "--set", "debug.inject_failure={rank: 4, round: 4, mode: stop}",
              timeout=270)
    assert r.returncode != 0
    assert "rank 4 (site 'hospital-b', rank 1 of 2 in site) made no progress for" in r.stderr, r.stderr
    assert "ending the job (fault.hang_timeout_s)" in r.stderr
    error = json.loads((tmp_path / "fast" / "logs" / "rank-0004.error.json").read_text())
    assert error["type"] == "Hang", error
    rounds = [json.loads(x) for x in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rounds if x["kind"] == "round"] == [1, 2, 3]  # stopped at the start of round 4
