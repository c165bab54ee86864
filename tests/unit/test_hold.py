"""debug.hold: what lets a test see a run live at a known round without racing the machine's speed."""
import threading

import pytest
from conftest import CONFIGS
from hpcfl.config import load_config
from hpcfl.errors import ConfigError
from hpcfl.protocol.server import maybe_hold


def cfg_with(tmp_path, round_=2):
    return load_config(CONFIGS / "digits.yaml", [f"debug.hold={{round: {round_}, file: '{tmp_path / 'gate'}'}}"])


def test_a_hold_after_the_last_round_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"debug\.hold\.round: 11 is after the last round \(10\)"):
        cfg_with(tmp_path, 11)


def test_hold_waits_while_the_file_exists_and_ends_on_a_stop(tmp_path):
    cfg, calls = cfg_with(tmp_path), []
    before, beat = (lambda: calls.append("before")), (lambda what, r: calls.append((what, r)))
    maybe_hold(cfg, 1, before, beat, stop=lambda: False)  # another round: nothing
    assert calls == []
    maybe_hold(cfg, 2, before, beat, stop=lambda: False)  # no file: the checkpoint wait only
    assert calls == ["before"]
    gate = tmp_path / "gate"
    gate.touch()
    threading.Timer(0.3, gate.unlink).start()
    maybe_hold(cfg, 2, before, beat, stop=lambda: False, poll_s=0.01)  # returns once the file is gone
    assert not gate.exists() and ("held (debug.hold)", 2) in calls
    gate.touch()
    maybe_hold(cfg, 2, before, beat, stop=lambda: True)  # a stop ends the hold, the file still there
    assert gate.exists()
