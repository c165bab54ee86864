"""The one message type of the round protocol (hpcfl.protocol.message): named, typed fields, packed into one
float64 buffer from the declared field list, never by hand-numbered positions."""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

from hpcfl.protocol.control import Control, Participation
from hpcfl.protocol.message import Message, per_site
from hpcfl.protocol.records import EvalRow, SiteInfo, SlotTimes, TrainRow


def test_the_plan_round_trips_with_and_without_the_balanced_slots():
    codes = np.array([0, 1, 2, 3, 0])
    ctl = Control(stop=False, aggregate=True, clip=0.75, codes=codes)
    got = Control.unpack(ctl.pack(5), 5)
    assert (got.stop, got.aggregate, got.clip, got.slot_of) == (False, True, 0.75, None)
    assert got.codes.dtype == np.int64 and list(got.codes) == list(codes)
    slots = np.array([1, -1, 0, 0, 1])
    both = Control(stop=True, clip=0.5, codes=codes, slot_of=slots)
    buf = both.pack(5)
    assert buf.dtype == np.float64 and buf.size == 3 + 2 * 5
    got = Control.unpack(buf, 5, ("slot_of",))
    assert got.stop and list(got.slot_of) == list(slots)
    assert Control.empty(5).size == 8 and Control.empty(5, ("slot_of",)).size == 13


def test_the_layout_follows_the_declared_fields():
    """Positions come from the field list: the plan's buffer is what the slots have always received."""
    names = [(name, start, stop) for name, _, start, stop in Control.layout(4, ("slot_of",))]
    assert names == [("stop", 0, None), ("aggregate", 1, None), ("clip", 2, None), ("codes", 3, 7),
                     ("slot_of", 7, 11)]
    back = Participation(np.array([True, False, True]))
    assert list(back.pack(3)) == [1.0, 0.0, 1.0]
    assert Participation.unpack(back.pack(3), 3).counts.dtype == bool


def test_a_message_defined_anywhere_packs_without_touching_hpcfl():
    @dataclass
    class Budget(Message):
        round_: int = 0
        spent: float = 0.0
        flagged: np.ndarray = per_site(bool)
        extra: Optional[np.ndarray] = per_site(float, optional=True)

    m = Budget(7, 2.5, np.array([True, False]), np.array([0.25, 4.0]))
    got = Budget.unpack(m.pack(2), 2, ("extra",))
    assert (got.round_, got.spent, list(got.flagged), list(got.extra)) == (7, 2.5, [True, False], [0.25, 4.0])
    assert Budget.unpack(Budget(1, 1.0, np.array([False, True])).pack(2), 2).extra is None


def test_a_field_that_cannot_be_packed_is_named():
    @dataclass
    class Notes(Message):
        text: str = ""

    with pytest.raises(TypeError, match=r"Notes.text: a packed message holds bool, int, float or per_site"):
        Notes("hi").pack(1)


def test_every_exchange_sends_messages():
    from hpcfl.protocol import crosssite, gathered, mean, records, startup

    sent = (TrainRow, EvalRow, SlotTimes, SiteInfo, records.TrainReport, records.EvalReport, gathered.Kept,
            mean.Revealed, crosssite.Owners, crosssite.HeldModels, crosssite.EvalRows, startup.Layout,
            startup.Verdict, startup.Fresh, startup.SiteReport, startup.PublicKeys)
    for cls in sent:
        assert issubclass(cls, Message), cls
    assert not hasattr(SiteInfo(0, 10, 3), "eval_size")  # dead: rank 0 never used it
