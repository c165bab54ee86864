"""Code only the tests use, kept out of the package: reference implementations the package's results are
checked against, and readers of what a run wrote (imported as ``from reference_impl import ...``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from hpcfl.errors import require
from hpcfl.observe.scalars import Scalar, record_scalars
from hpcfl.observe.tensorboard import INSTALL


def accumulate_metrics(vec: np.ndarray, probs: np.ndarray, labels: np.ndarray, loss_sum: float, bins: int) -> None:
    """hpcfl.metrics' vector of sums in NumPy, the reference of task classify's on-device accumulation: add
    one batch (class probabilities (n, C), integer labels (n,)) into ``vec`` in place."""
    n, c = probs.shape
    pred = probs.argmax(1)
    vec[0] += loss_sum
    vec[1] += float((pred == labels).sum())
    vec[2] += n
    vec[3:3 + c] += np.bincount(labels[pred == labels], minlength=c)[:c]
    vec[3 + c:3 + 2 * c] += np.bincount(labels, minlength=c)[:c]
    b = np.clip((probs * bins).astype(np.int64), 0, bins - 1)  # (n, C) bin of each class score
    pos = (labels[:, None] == np.arange(c)[None, :])
    idx = np.arange(c)[None, :] * bins + b  # flat (class, bin)
    hist = vec[3 + 2 * c:].reshape(2, c * bins)
    hist[0] += np.bincount(idx[pos], minlength=c * bins)
    hist[1] += np.bincount(idx[~pos], minlength=c * bins)


def rounds_scalars(records: Iterable[Dict[str, Any]]) -> List[Tuple[int, Scalar]]:
    """(step, scalar) for every record that has a round."""
    out: List[Tuple[int, Scalar]] = []
    for rec in records:
        if "round" in rec:
            out.extend((int(rec["round"]), s) for s in record_scalars(rec))
    return out


def read_scalars(logdir: Path) -> Dict[tuple, Dict[int, float]]:
    """{(series, tag): {step: value}} read back with TensorBoard's EventAccumulator, as TensorBoard shows them.

    A step seen twice (a resumed run's rounds that were not purged) raises ValueError: TensorBoard would
    draw both values."""
    require("tensorboard", INSTALL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = Path(logdir)
    out: Dict[tuple, Dict[int, float]] = {}
    dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    for d in dirs:
        series = "" if d == logdir else d.relative_to(logdir).as_posix()
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            out[(series, tag)] = {e.step: e.value for e in events}
            if len(out[(series, tag)]) != len(events):
                raise ValueError(f"{d}: {tag}: a step written twice: {[e.step for e in events]}")
    return out
