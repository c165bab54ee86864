"""The automatic hang timeout follows the rounds once they are known: the long floor through start-up, the first
round and the final cross-site evaluation; then five times the slowest later round, at least fault.hang_min_s."""
from hpcfl.rundir import RunPaths
from hpcfl.watchdog import Heartbeat, Watchdog, auto_timeout, excuse, verdict


def test_the_rule():
    assert auto_timeout([], floor_s=300, min_s=60) == 300  # start-up, first round
    assert auto_timeout([13.0], floor_s=300, min_s=60) == 300  # the first round alone says little (warm-up)
    assert auto_timeout([100.0], floor_s=300, min_s=60) == 500  # a first round slower than the floor counts
    assert auto_timeout([13.0, 0.2, 0.3], floor_s=300, min_s=60) == 60  # fast rounds: the minimum
    assert auto_timeout([13.0, 0.2, 20.0, 0.3], floor_s=300, min_s=60) == 100  # five times the slowest later round
    assert auto_timeout([400.0, 90.0], floor_s=300, min_s=60) == 450  # slow rounds keep a long timeout


def test_the_watchdog_uses_its_own_heartbeats_rounds(tmp_path):
    beat = Heartbeat(RunPaths(tmp_path), 0)
    dog = Watchdog(RunPaths(tmp_path), [1], None, 300.0, lambda *a: None, own=beat, min_s=60.0)
    assert dog.timeout() == 300
    for r, s in enumerate((5.0, 0.2, 0.4), start=1):
        beat.round_done(r, s)
    assert dog.timeout() == 60
    assert Watchdog(RunPaths(tmp_path), [1], 8.0, 300.0, lambda *a: None, own=beat).timeout() == 8  # set by the user: stands


def test_start_up_and_cross_site_evaluation_keep_the_floor():
    now = 10_000.0
    beat = lambda phase, age: {"phase": phase, "time": now - 1, "progress_time": now - age, "who": "rank 1"}  # noqa: E731
    for phase in ("start-up: import torch", "cross-site evaluation"):
        assert verdict({1: beat(phase, 200)}, now, 60, {1: 0.0}, startup_timeout=300) is None, phase
    line = verdict({1: beat("train", 200)}, now, 60, {1: 0.0}, startup_timeout=300)
    assert line == "rank 1 made no progress for 200s (phase: train)"


def test_a_node_whose_every_rank_stopped_beating_is_named_lost():
    now = 10_000.0

    def beat(rank, host, site, age):
        return {"rank": rank, "host": host, "phase": "train", "time": now - age, "progress_time": now - age,
                "who": f"rank {rank} (site {site!r}, rank {(rank - 1) % 2} of 2 in site)"}
    beats = {1: beat(1, "n1", "hospital-a", 1), 2: beat(2, "n1", "hospital-a", 1),
             3: beat(3, "n2", "hospital-b", 70), 4: beat(4, "n2", "hospital-b", 71)}
    line = verdict(beats, now, 60, {}, own_host="n1")
    assert line == "node n2 is lost or unreachable: its ranks 3, 4 (site hospital-b) all stopped beating 71s ago"
    # seen on the two-node tier: the first rank of the node is past the timeout, the other, which wrote its
    # last beat a second later, not yet: the node is named all the same
    beats[4] = beat(4, "n2", "hospital-b", 59)
    assert verdict(beats, now, 60, {}, own_host="n1").startswith("node n2 is lost or unreachable: its ranks 3, 4")
    # one rank of the node still beats: a frozen process, not the node
    beats[4] = beat(4, "n2", "hospital-b", 3)
    assert verdict(beats, now, 60, {}, own_host="n1").startswith("rank 3 (site 'hospital-b', rank 0 of 2 in site) made")
    # the watcher's own node is never "lost" (it is running the watchdog)
    beats = {1: beat(1, "n1", "hospital-a", 70), 2: beat(2, "n1", "hospital-a", 70)}
    assert verdict(beats, now, 60, {}, own_host="n1").startswith("rank 1 (site 'hospital-a'")
    assert verdict(beats, now, 60, {}, own_host="n0").startswith("node n1 is lost or unreachable: its ranks 1, 2")


def test_a_node_whose_ranks_live_but_no_longer_reach_rank_0_is_named_unreachable():
    from hpcfl.reach import unreachable_node

    now = 10_000.0

    def beat(rank, host, site, reached, phase="upload", progress=40):
        return {"rank": rank, "host": host, "phase": phase, "time": now - 1, "progress_time": now - progress,
                "who": f"rank {rank} (site {site!r}, rank {(rank - 1) % 2} of 2 in site)", "reached_rank0": now - reached}
    # seen on the two-node tier with node 2's link down: a rank of node 1 looks stuck in training (Horovod
    # coordinates every process set through all ranks), node 2's ranks still beat through the filesystem
    beats = {1: beat(1, "n1", "hospital-a", 1, "train", 35), 2: beat(2, "n1", "hospital-a", 1, "train", 35),
             3: beat(3, "n2", "hospital-b", 36), 4: beat(4, "n2", "hospital-b", 34)}
    line = verdict(beats, now, 30, {}, own_host="n1")
    assert line == ("node n2 is unreachable: its ranks 3, 4 (site hospital-b) still run but have not reached rank 0's "
                    "node n1 over the network for 34s")
    assert verdict(beats, now, 40, {}, own_host="n1") is None  # no rank past the timeout yet: no verdict at all
    beats[4]["reached_rank0"] = now - 2  # one of them still reaches rank 0: not the node's network
    assert verdict(beats, now, 30, {}, own_host="n1").startswith("rank 1 (site 'hospital-a'")
    del beats[3]["reached_rank0"], beats[4]["reached_rank0"]  # never reached it (a blocked port): not judged
    assert unreachable_node(beats, now, 30, "n1") is None


def test_a_node_cut_just_after_the_ranks_began_to_wait_is_named_unreachable_not_a_deadlock():
    """Seen on the two-node tier: every rank waited at rank 0's hold from t=0; node 2's link was cut at t=1.3,
    its ranks' last probes had succeeded at t=-1.4 and t=1.3. At t=31 every rank had waited past the 30 s
    timeout while one probe was 29.7 s old: the cut node is the cause all the same (its probes have failed
    for far longer than a probe period), not a deadlock."""
    from hpcfl.reach import UNREACHED_S

    now = 10_000.0

    def beat(rank, host, site, reached):
        return {"rank": rank, "host": host, "phase": "upload", "time": now - 1, "progress_time": now - 31,
                "who": f"rank {rank} (site {site!r}, rank {(rank - 1) % 2} of 2 in site)", "reached_rank0": now - reached}
    beats = {1: beat(1, "n1", "hospital-a", 1), 2: beat(2, "n1", "hospital-a", 2),
             3: beat(3, "n2", "hospital-b", 32.4), 4: beat(4, "n2", "hospital-b", 29.7)}
    assert verdict(beats, now, 30, {}, own_host="n1") == (
        "node n2 is unreachable: its ranks 3, 4 (site hospital-b) still run but have not reached rank 0's node n1 "
        "over the network for 30s")
    # probes that failed for less than a few probe periods do not make a node the cause: the deadlock is named
    beats[4]["reached_rank0"] = now - (UNREACHED_S - 1)
    assert verdict(beats, now, 30, {}, own_host="n1").startswith("every rank has been waiting for 31s")


def test_a_killed_node_is_lost_not_unreachable_while_its_last_beats_are_still_young():
    """Every process of node 2 killed 31 s ago: its ranks last reached rank 0 up to 3 s before that (probe
    every 3 s) and last beat up to 2 s before; at a 33 s timeout the probe's age is past it and the beats'
    not yet. The node does not 'still run': it is named lost (seen on the two-node tier, now and then)."""
    from hpcfl.reach import unreachable_node

    now = 10_000.0

    def beat(rank, host, site, last, reached, phase="upload", progress=40):
        return {"rank": rank, "host": host, "phase": phase, "time": now - last, "progress_time": now - progress,
                "who": f"rank {rank} (site {site!r}, rank {(rank - 1) % 2} of 2 in site)", "reached_rank0": now - reached}
    beats = {1: beat(1, "n1", "hospital-a", 1, 1, "train", 35), 2: beat(2, "n1", "hospital-a", 1, 1, "train", 35),
             3: beat(3, "n2", "hospital-b", 32, 34), 4: beat(4, "n2", "hospital-b", 31.5, 33.5)}
    assert unreachable_node(beats, now, 33, "n1") is None
    line = verdict(beats, now, 33, {}, own_host="n1")
    assert line.startswith("node n2 is lost or unreachable: its ranks 3, 4 (site hospital-b) all stopped beating"), line


def test_the_probe_reaches_rank_0(tmp_path):
    import json
    import time as t

    from hpcfl import reach

    server = reach.ProbeServer()
    paths = RunPaths(tmp_path)
    paths.logs.mkdir()
    paths.beat_path(0).write_text(json.dumps({"probe": ["127.0.0.1", server.address[1]]}))
    beat = Heartbeat(paths, 1)
    reach.PROBE_S, old = 0.05, reach.PROBE_S
    try:
        prober = reach.Prober(beat, paths.beat_path(0))
        deadline = t.monotonic() + 30
        while "reached_rank0" not in beat.state:
            assert t.monotonic() < deadline, "the probe never reached rank 0's port"
            t.sleep(0.05)
        prober.stop()
    finally:
        reach.PROBE_S = old


def test_time_in_which_the_watchdog_itself_did_not_run_is_not_counted_against_a_rank():
    # the machine stalled for 14 s (the watchdog's 1 s poll came 14 s late): a rank whose last progress was 44 s
    # ago at a 30 s timeout was watched for 30 s only; a rank stuck since before the stall is still named
    now = 10_000.0
    beats = {1: {"phase": "evaluate global model", "time": now - 1, "progress_time": now - 44, "who": "rank 1",
                 "reached_rank0": now - 2},
             2: None}
    stalls = [(now - 20, now - 6)]
    assert verdict(beats, now, 30, {2: now}) == "rank 1 made no progress for 44s (phase: evaluate global model)"
    moved = excuse(beats, stalls, now)
    assert moved[1]["progress_time"] == now - 30 and moved[1]["time"] == now - 1 and moved[1]["reached_rank0"] == now - 2
    assert moved[2] is None and beats[1]["progress_time"] == now - 44  # the beats read are not changed
    assert verdict(moved, now, 30, {2: now}) is None
    beats[1]["progress_time"] = now - 60
    assert verdict(excuse(beats, stalls, now), now, 30, {2: now}) == \
        "rank 1 made no progress for 46s (phase: evaluate global model)"
    assert excuse(beats, [], now) is beats


def test_a_late_poll_of_the_watchdog_is_recorded_as_a_stall(tmp_path, monkeypatch):
    import hpcfl.watchdog as wd

    clock = iter([0.0, 15.0, 16.0])  # monotonic: a 1 s poll that returned after 15 s, then one on time
    monkeypatch.setattr(wd.time, "monotonic", lambda: next(clock))
    seen = []
    monkeypatch.setattr(wd, "excuse", lambda beats, stalls, now: seen.append(list(stalls)) or beats)
    dog = Watchdog(RunPaths(tmp_path), [1], 30.0, 300.0, lambda *a: None, poll_s=1.0)
    dog._started = {1: wd.time.time() + 3600}  # no beat yet, and no verdict on that
    waits = iter([False, False, True])
    dog._stop.wait = lambda s: next(waits)
    dog._run()
    assert len(seen) == 2 and len(seen[0]) == 1 and abs(seen[0][0][1] - seen[0][0][0] - 14.0) < 1e-6 and seen[1] == seen[0]
