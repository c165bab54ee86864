"""Slide-level labels (``slide_id,label[,site]``), checked against the slides they label.

A pathology consortium has one label per slide (tumour type, metastasis yes/no),
not per tile. The CSV has a header naming ``slide_id`` and ``label`` (a ``site``
column, optional, says which site owns each slide); every slide of the tile
index (or feature directory) needs exactly one row and every row a slide. Each
kind of problem is reported in one line naming the file, the lines and the
slides, all kinds together in one error.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError

SHOWN = 5  # slides named per problem line; the rest are counted


@dataclass(frozen=True)
class SlideLabels:
    """Labels of the slides, in slide order (sorted ids), with classes ordered as :func:`class_order` says."""

    path: str
    slide_ids: List[str]
    labels: List[int]  # index into classes, one per slide
    classes: List[str]
    sites: Optional[List[str]]  # owning site per slide, where the CSV has a site column

    def label_of(self) -> Dict[str, int]:
        return dict(zip(self.slide_ids, self.labels))


def class_order(values: Sequence[str]) -> List[str]:
    """Distinct labels, numerically ordered when all are integers (0, 1, 2, 10), else alphabetically:
    for two classes the second is the positive one (1, or e.g. 'tumour' after 'normal')."""
    distinct = set(values)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _read_rows(path: Path):
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read slide labels: {exc}") from None
    rows = [(n, r) for n, r in enumerate(rows, 1) if r and any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"{path}: no rows; expected a header `slide_id,label` and one row per slide")
    head = [c.strip().lower() for c in rows[0][1]]
    if "slide_id" not in head or "label" not in head:
        raise ConfigError(f"{path}: line {rows[0][0]}: the header must name the columns slide_id and label "
                          f"(optionally site), got {','.join(rows[0][1])!r}")
    return head, rows[1:]


def read_labels(path, slide_ids: Sequence[str], sites: Sequence[str] = ()) -> SlideLabels:
    """The labels of ``slide_ids`` from the CSV at ``path``; ConfigError with one line per kind of
    problem: rows without a slide, slides without a row, duplicate rows, empty labels, unknown sites."""
    path = Path(path)
    head, rows = _read_rows(path)
    i_id, i_lab = head.index("slide_id"), head.index("label")
    i_site = head.index("site") if "site" in head else None
    known = set(slide_ids)
    seen: Dict[str, int] = {}
    got: Dict[str, tuple] = {}
    unknown, dupes, empty, bad_site, short = [], [], [], [], []
    for n, r in rows:
        cells = [c.strip() for c in r]
        if len(cells) <= max(i_id, i_lab, i_site or 0):
            short.append(f"line {n}")
            continue
        sid, lab = cells[i_id], cells[i_lab]
        site = cells[i_site] if i_site is not None else None
        if sid in seen:
            dupes.append(f"{sid} (lines {seen[sid]} and {n})")
            continue
        seen[sid] = n
        if sid not in known:
            unknown.append(f"{sid} (line {n})")
        elif not lab:
            empty.append(f"{sid} (line {n})")
        elif site is not None and sites and site not in sites:
            bad_site.append(f"{sid}: {site!r} (line {n})")
        else:
            got[sid] = (lab, site)
    missing = [s for s in slide_ids if s not in seen]
    problems = []
    if short:
        problems.append(f"{len(short)} row(s) with too few columns: {_named(short)}")
    if unknown:
        problems.append(f"{len(unknown)} row(s) name a slide that is not in the index: {_named(unknown)}")
    if missing:
        problems.append(f"{len(missing)} slide(s) of the index have no label: {_named(missing)}")
    if dupes:
        problems.append(f"{len(dupes)} slide(s) labelled more than once: {_named(dupes)}")
    if empty:
        problems.append(f"{len(empty)} row(s) with an empty label: {_named(empty)}")
    if bad_site:
        problems.append(f"{len(bad_site)} row(s) name a site the config does not have ({', '.join(sites)}): "
                        f"{_named(bad_site)}")
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    ids = sorted(got)
    classes = class_order([got[s][0] for s in ids])
    if len(classes) < 2:
        raise ConfigError(f"{path}: every slide has the label {classes[0]!r}; a classifier needs two classes or more")
    return SlideLabels(str(path), ids, [classes.index(got[s][0]) for s in ids], classes,
                       [got[s][1] for s in ids] if i_site is not None else None)


def owned_by_site(labels: SlideLabels, slide_ids: Sequence[str], site_names: Sequence[str],
                  min_per_site: int = 2) -> List[np.ndarray]:
    """Indices into ``slide_ids`` each site owns, from the labels' site column (a site needs one slide to
    train on and one to validate on)."""
    if labels.sites is None:
        raise ConfigError(f"{labels.path}: has no site column; partitioning slides by it needs "
                          "`slide_id,label,site` rows")
    owner = dict(zip(labels.slide_ids, labels.sites))
    parts = [np.asarray([i for i, s in enumerate(slide_ids) if owner.get(s) == name], np.int64)
             for name in site_names]
    few = [f"{n} ({len(p)})" for n, p in zip(site_names, parts) if len(p) < min_per_site]
    if few:
        raise ConfigError(f"{labels.path}: site(s) with fewer than {min_per_site} slides in its site column: "
                          f"{', '.join(few)}")
    return parts


__all__ = ["SlideLabels", "read_labels", "class_order", "owned_by_site"]
