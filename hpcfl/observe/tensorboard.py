"""TensorBoard event files written with tensorboard's own writer and protos: no torch, no TensorFlow.

Rank 0 never imports torch (README, "How it works"), so ``torch.utils.tensorboard``
is out; ``tensorboard.summary.writer.event_file_writer.EventFileWriter`` writes the
same TFRecord event files and needs only tensorboard and protobuf.

Layout under ``runs/<name>/tb/``: the federation's series at the top, one
subdirectory per site (``sites/<site>/``), so TensorBoard draws every site on
the chart of a tag. A resumed run writes a ``SessionLog.START`` at its first
round: TensorBoard then drops the events of rounds a crash left after the last
checkpoint (its "orphaned data" purge), so no round is drawn twice.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterable, Optional

from ..errors import require
from .scalars import Scalar

INSTALL = "pip install tensorboard (or set observe.tensorboard: false)"


def _modules():
    require("tensorboard", INSTALL)
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return EventFileWriter, event_pb2, summary_pb2


class TensorBoardWriter:
    """Scalars per (series, tag, step) into event files below ``logdir``; one file per series and process."""

    def __init__(self, logdir: Path, start_round: int = 1):
        self.logdir = Path(logdir)
        self.start_round = start_round
        self._EventFileWriter, self._event_pb2, self._summary_pb2 = _modules()
        self._writers: Dict[str, object] = {}

    def _writer(self, series: str):
        w = self._writers.get(series)
        if w is None:
            w = self._EventFileWriter(str(self.logdir / series if series else self.logdir), flush_secs=10)
            if self.start_round > 1:  # drop what a crash left beyond the checkpoint we resume from
                w.add_event(self._event_pb2.Event(
                    wall_time=time.time(), step=self.start_round,
                    session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))
            self._writers[series] = w
        return w

    def write(self, step: int, scalars: Iterable[Scalar], wall_time: Optional[float] = None) -> None:
        by_series: Dict[str, list] = {}
        for series, tag, value in scalars:
            by_series.setdefault(series, []).append(self._summary_pb2.Summary.Value(tag=tag, simple_value=value))
        t = time.time() if wall_time is None else wall_time
        for series, values in by_series.items():
            self._writer(series).add_event(self._event_pb2.Event(
                wall_time=t, step=int(step), summary=self._summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
