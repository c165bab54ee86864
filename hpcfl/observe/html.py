"""``hpcfl report RUN_DIR [RUN_DIR ...]``: one self-contained HTML file (no network, no script).

Images are PNGs embedded as ``data:`` URIs and styles are inline, so the file
can be mailed or opened offline. Every number in a table keeps its exact value
in a ``data-value`` attribute next to the rounded text (with ``data-metric``,
``data-round``, ``data-site``, ``data-model``), so a script or a test can check
the tables against metrics.jsonl.
"""
from __future__ import annotations

import base64
import html
import io
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..rundir.paths import RunPaths
from . import plots
from .rundata import RunData, RunDirError, load_run

THUMB_SIDE = 420  # tiling thumbnails are embedded at this longest side

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.t,th.t{text-align:left}
img.plot{max-width:100%;display:block;margin:.5em 0}
.thumbs{display:flex;flex-wrap:wrap;gap:1em}.thumbs figure{margin:0;font-size:.8em}
.muted{color:#777}.scroll{max-height:30em;overflow:auto;display:inline-block}
"""


# -- small HTML helpers -----------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape("-" if x is None else str(x))


def img(data: bytes, alt: str, mime: str = "image/png", cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">'


def num_cell(value: Any, metric: str, spec: str = ".4f", **where: Any) -> str:
    """A table cell with the rounded number as text and the exact one in ``data-value``."""
    attrs = f' data-metric="{esc(metric)}"' + "".join(f' data-{k}="{esc(v)}"' for k, v in where.items() if v is not None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td{attrs}>-</td>"
    text = format(value, spec) if math.isfinite(value) else str(value)
    return f'<td{attrs} data-value="{value!r}">{text}</td>'


def text_cell(x: Any) -> str:
    return f'<td class="t">{esc(x)}</td>'


def table(head: Sequence[str], rows: Iterable[str], name: str, left: int = 1) -> str:
    th = "".join(f'<th class="t">{esc(h)}</th>' if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(head))
    return f'<table data-table="{esc(name)}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def figure(data: Optional[bytes], alt: str) -> str:
    return img(data, alt) if data else ""


# -- sections of one run --------------------------------------------------------------------------------------
def overview(run: RunData, i: int) -> str:
    cfg = run.config
    fl, data, model = cfg.get("fl") or {}, cfg.get("data") or {}, cfg.get("model") or {}
    short = cfg.get("sites") if isinstance(cfg.get("sites"), dict) else None  # {count, ranks}
    sites = (f"{short.get('count')} sites x{short.get('ranks', 1)}" if short else
             ", ".join(f"{s.get('name')} x{s.get('ranks', 1)}" for s in cfg.get("sites") or [] if isinstance(s, dict)))
    rounds = run.rounds()
    last = rounds[-1] if rounds else {}
    summ = run.summary or {}
    done = last.get("round", 0)
    rows = [text_cell("run directory") + text_cell(run.path.resolve()),
            text_cell("sites") + text_cell(sites or None),
            text_cell("data / model") + text_cell(f"{data.get('name')} / {model.get('name')}" if cfg.get("task") != "segment"
                                                  else f"{data.get('name')} / {(cfg.get('segment') or {}).get('net')}"),
            text_cell("strategy") + text_cell(fl.get("strategy", "fedavg")),
            text_cell("rounds done") + text_cell(f"{done} of {run.rounds_total or '?'}"),
            text_cell("state") + text_cell("finished" if summ and summ.get("stopped_after_round") is None else
                                           f"stopped after round {summ['stopped_after_round']}" if summ else
                                           "running, interrupted or failed (no summary.json)")]
    if last:
        for key in ("val_accuracy", "val_loss", "local_val_accuracy", "val_auc", "val_mean_dice", "local_val_mean_dice"):
            if key in last:
                rows.append(text_cell(f"final {key}") + num_cell(last[key], key, round=done, run=i, kind="final"))
    best = summ.get("best") or last.get("best")
    if isinstance(best, dict) and "value" in best:
        rows.append(text_cell(f"best {best.get('metric')} (round {best.get('round')})")
                    + num_cell(best["value"], str(best.get("metric")), round=best.get("round"), run=i, kind="best"))
    if isinstance(summ.get("elapsed_s"), (int, float)):
        rows.append(text_cell("rank 0 elapsed") + num_cell(summ["elapsed_s"], "elapsed_s", ".1f", run=i))
    return f'<table data-table="overview" data-run="{i}">' + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>"


ROUND_COLUMNS = [("sites", None), ("val_accuracy", ".4f"), ("val_loss", ".4f"), ("local_val_accuracy", ".4f"),
                 ("val_auc", ".4f"), ("val_balanced_accuracy", ".4f"), ("dp_epsilon", ".4g"), ("round_s", ".3f"),
                 ("train_s", ".3f"), ("overhead_s", ".3f"), ("val_mean_dice", ".4f"), ("local_val_mean_dice", ".4f"),
                 ("val_hd95", ".3f")]


def rounds_table(run: RunData, i: int) -> str:
    """The federation per round: one row per round summary of metrics.jsonl."""
    rounds = run.rounds()
    cols = [c for c in ROUND_COLUMNS if c[0] == "sites" or any(c[0] in r or c[0] in (r.get("time") or {})
                                                               for r in rounds)]
    rows = []
    for r in rounds:
        cells = [num_cell(r["round"], "round", "d", round=r["round"], run=i)]
        for key, spec in cols:
            if key == "sites":
                cells.append(text_cell(f"{r.get('sites_done', '?')}/{r.get('sites_total', '?')}"))
            else:
                v = r[key] if key in r else (r.get("time") or {}).get(key)
                cells.append(num_cell(v, key if key in r else f"time/{key}", spec, round=r["round"], run=i))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return table(["round"] + [k for k, _ in cols], rows, "rounds", left=0)


def sites_table(run: RunData, i: int) -> str:
    """Every site, every round: status, the global model's and the locally tuned model's validation metrics."""
    rows = []
    metric = plots.site_metric(run)
    val_g = {(r.get("round"), r.get("site")): r for r in run.site_records("val", "global")}
    val_l = {(r.get("round"), r.get("site")): r for r in run.site_records("val", "local")}
    train = {(r.get("round"), r.get("site")): r for r in run.site_records("train", "local")}
    for key in sorted(val_g, key=lambda k: (k[0], run.sites().index(k[1]) if k[1] in run.sites() else 0)):
        rnd, site = key
        g, loc, tr = val_g[key], val_l.get(key, {}), train.get(key, {})
        where = dict(round=rnd, site=site, run=i)
        rows.append("<tr>" + num_cell(rnd, "round", "d", **where) + text_cell(site) + text_cell(g.get("status"))
                    + num_cell(g.get(metric), metric, model="global", **where)
                    + num_cell(g.get("loss"), "loss", model="global", **where)
                    + num_cell(loc.get(metric), metric, model="local", **where)
                    + num_cell(loc.get("loss"), "loss", model="local", **where)
                    + num_cell(tr.get("loss"), "train_loss", model="local", **where)
                    + num_cell(g.get("samples"), "samples", "d", model="global", **where) + "</tr>")
    short = {"accuracy": "acc", "mean_dice": "mean Dice"}.get(metric, metric)
    head = ["round", "site", "status", f"val {short} (global)", "val loss (global)", f"val {short} (local)",
            "val loss (local)", "train loss", "val samples"]
    return '<div class="scroll">' + table(head, rows, "sites", left=3) + "</div>"


def cross_site_table(run: RunData, i: int) -> str:
    models = (run.cross_site or {}).get("models") or {}
    if not models:
        return ""
    cols = [s for s in run.sites() if any(s in (m or {}) for m in models.values())]
    rows = []
    key = plots.cross_site_metric(run)
    for m, per in models.items():
        rows.append("<tr>" + text_cell(f"{m} model") + "".join(
            num_cell(((per or {}).get(c) or {}).get(key), key, model=m, site=c, run=i, kind="cross_site")
            for c in cols) + "</tr>")
    return table(["model \\ data"] + cols, rows, "cross_site")


def placement_table(run: RunData) -> str:
    ranks = (run.manifest or {}).get("ranks") or []
    if not ranks:
        return '<p class="muted">no manifest.json (the run has not started all its ranks)</p>'
    rows = []
    for r in ranks:
        if not isinstance(r, dict):
            continue
        aff = r.get("cpu_affinity") or []
        cpus = (f"{aff[0]}-{aff[-1]}" if len(aff) > 1 and aff == list(range(aff[0], aff[-1] + 1))
                else ",".join(map(str, aff))) if aff else None
        gpu = r.get("gpu")
        sites = ", ".join(map(str, r["sites"])) if isinstance(r.get("sites"), list) and r["sites"] else r.get("site")
        rows.append("<tr>" + "".join(text_cell(x) for x in (
            r.get("rank"), r.get("role"), sites, r.get("rank_in_site"), r.get("host"), r.get("pid"), cpus,
            r.get("torch_threads"), (gpu or {}).get("name") if isinstance(gpu, dict) else gpu)) + "</tr>")
    return table(["rank", "role", "sites", "rank in site", "host", "pid", "CPUs", "threads", "GPU"], rows, "placement",
                 left=9)


def partition_table(run: RunData) -> str:
    part = (run.manifest or {}).get("partition") or {}
    sites = part.get("sites") if isinstance(part, dict) else None
    if not isinstance(sites, dict) or not sites:
        return ""
    rows = []
    slides = any(site_slides(p) for p in sites.values())
    for name, p in sites.items():
        if not isinstance(p, dict):
            continue
        classes = p.get("classes") or {}
        rows.append("<tr>" + text_cell(name) + text_cell(p.get("train")) + text_cell(p.get("val"))
                    + text_cell(", ".join(f"{k}: {v}" for k, v in classes.items()) if isinstance(classes, dict) else None)
                    + (text_cell(", ".join(f"{k}{' (val)' if v == 'val' else ''}" for k, v in site_slides(p).items())
                                 or None) if slides else "") + "</tr>")
    head = ["site", "train", "val", "classes (train)"] + (["slides"] if slides else [])
    return table(head, rows, "partition", left=len(head))


def site_slides(p: Any) -> Dict[str, str]:
    """{slide id: "train" | "val"} of a site's partition record in manifest.json (tile runs)."""
    if not isinstance(p, dict):
        return {}
    out = {str(s): "train" for s in p.get("train_slides") or []}
    out.update({str(s): "val" for s in p.get("val_slides") or []})
    return out


def index_dir_of(run: RunData) -> Optional[Path]:
    """The tile index the run used (``data.tiles.index_dir``, relative to where it was launched)."""
    data = run.config.get("data") or {}
    if data.get("name") != "tiles":
        return None
    d = Path(str((data.get("tiles") or {}).get("index_dir") or "data/index"))
    if d.is_absolute():
        return d if d.is_dir() else None
    root = Path(str((run.config.get("run") or {}).get("root") or "runs"))
    guesses = [Path.cwd() / d]
    if not root.is_absolute():  # launched where <run.root> was relative to: go up as many levels as it has
        guesses.append(run.path.resolve().parents[len(root.parts)] / d)
    return next((g for g in guesses if g.is_dir()), None)


def thumbnails(run: RunData) -> str:
    idx = index_dir_of(run)
    if idx is None:
        return ""
    from PIL import Image

    owner: Dict[str, str] = {}
    for site, p in (((run.manifest or {}).get("partition") or {}).get("sites") or {}).items():
        for slide, split in site_slides(p).items():
            owner[slide] = f"{site}, {split}"
    figs = []
    for png in sorted(idx.glob("*.thumbnail.png")):
        slide = png.name[:-len(".thumbnail.png")]
        try:
            with Image.open(png) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
        except (OSError, ValueError) as exc:
            figs.append(f"<figure>{esc(slide)}: cannot read {esc(png)} ({esc(exc)})</figure>")
            continue
        site = f" ({owner[slide]})" if slide in owner else ""
        figs.append(f"<figure>{img(buf.getvalue(), f'tiling of {slide}', 'image/jpeg', 'thumb')}"
                    f"<figcaption>{esc(slide + site)}</figcaption></figure>")
    if not figs:
        return ""
    return (f"<h3>Tiling thumbnails</h3><p class=\"muted\">{esc(idx)}: tiles outlined by label, filled by class</p>"
            f"{tiling_legend(idx)}<div class=\"thumbs\">{''.join(figs)}</div>")


def tiling_legend(idx: Path) -> str:
    """The thumbnails' colours in HTML (the legend drawn in each PNG is small once embedded)."""
    from ..wsi.tiling import CLASS_COLOURS, LABEL_COLOURS
    from .rundata import read_json

    try:
        classes = (read_json(idx / "index.json") or {}).get("classes") or []
    except RunDirError:
        classes = []

    def swatch(rgb, outline: bool) -> str:
        colour = "#%02x%02x%02x" % tuple(rgb)
        style = f"border:2px solid {colour}" if outline else f"background:{colour};border:2px solid {colour}"
        return f'<span style="display:inline-block;width:.8em;height:.8em;{style};margin:0 .3em 0 1em"></span>'

    items = [swatch(c, True) + esc(lab) for lab, c in LABEL_COLOURS.items()]
    items += [swatch(CLASS_COLOURS[k % len(CLASS_COLOURS)], False) + esc(name) for k, name in enumerate(classes)]
    return f'<p class="legend">{"".join(items)}</p>'



# The figures of a run (functions of hpcfl.observe.plots), drawn before the HTML is assembled
ROUND_FIGURES = ("accuracy_loss", "time_breakdown", "participation", "dp_epsilon", "other_round_metrics")
_RUNS: Sequence[RunData] = ()  # what forked figure workers draw from


def _draw(job: Tuple[str, int]) -> Optional[bytes]:
    name, i = job
    return getattr(plots, name)(_RUNS if i < 0 else _RUNS[i])


def draw_figures(runs: Sequence[RunData]) -> Dict[Tuple[str, int], Optional[bytes]]:
    """Every figure of the report, keyed by (plot function, run index; -1 = all runs), drawn by forked workers
    on the CPUs this process may use: matplotlib takes 0.1-0.6 s a figure, the rest of the report milliseconds,
    and `hpcfl launch` waits for the report before it returns."""
    global _RUNS
    jobs = [(name, i) for i, run in enumerate(runs) if run.rounds() for name in ROUND_FIGURES]
    jobs += [("cross_site", i) for i, run in enumerate(runs) if run.cross_site]
    jobs += [("compare_runs", -1)] if len(runs) > 1 else []
    _RUNS = runs
    try:
        workers = min(len(jobs), len(os.sched_getaffinity(0)), 4)
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            plots.pyplot()  # imported once, before the fork
            try:
                ctx = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    return dict(zip(jobs, pool.map(_draw, jobs)))
            except (OSError, BrokenProcessPool):
                pass  # no processes to be had: draw them here
        return {job: _draw(job) for job in jobs}
    finally:
        _RUNS = ()


def run_section(run: RunData, i: int, figs: Dict[Tuple[str, int], Optional[bytes]]) -> str:
    parts = [f'<h2 id="run-{i}">{esc(run.name)}</h2>', overview(run, i)]
    if run.rounds():
        what = plots.site_metric(run).replace("_", " ")
        parts += [f"<h3>Validation {what} and loss per site per round</h3>",
                  figure(figs[("accuracy_loss", i)], f"{run.name}: validation {what} and loss per site per round"),
                  "<h3>Per round (federation, all sites)</h3>", rounds_table(run, i),
                  "<h3>Where the time goes</h3>",
                  figure(figs[("time_breakdown", i)], f"{run.name}: time breakdown per round")]
        part = figs[("participation", i)]
        if part:
            parts += ["<h3>Participation</h3>", figure(part, f"{run.name}: participation per round")]
        eps = figs[("dp_epsilon", i)]
        if eps:
            parts += ["<h3>Differential privacy</h3>", figure(eps, f"{run.name}: DP epsilon per round")]
        other = figs[("other_round_metrics", i)]
        if other:
            parts += ["<h3>Other per-round metrics</h3>", figure(other, f"{run.name}: other per-round metrics")]
        parts += ["<h3>Per site, per round</h3>", sites_table(run, i)]
    else:
        parts.append('<p class="muted">no round finished yet (metrics.jsonl holds no round record)</p>')
    if run.cross_site:
        parts += ["<h3>Cross-site validation</h3>", figure(figs[("cross_site", i)],
                                                                   f"{run.name}: cross-site {plots.cross_site_metric(run)}"),
                  cross_site_table(run, i)]
    from .heatmaps import attention_section

    parts.append(attention_section(run.path, esc, img))
    parts += ["<h3>Rank placement</h3>", placement_table(run), partition_table(run), thumbnails(run)]
    return "\n".join(p for p in parts if p)


def comparison(runs: Sequence[RunData], figs: Dict[Tuple[str, int], Optional[bytes]]) -> str:
    if len(runs) < 2:
        return ""
    rows = []
    for i, run in enumerate(runs):
        last = (run.rounds() or [{}])[-1]
        times = [r["time"]["round_s"] for r in run.rounds()[1:] if isinstance(r.get("time"), dict)
                 and isinstance(r["time"].get("round_s"), (int, float))]
        rows.append("<tr>" + text_cell(run.name) + text_cell((run.config.get("fl") or {}).get("strategy", "fedavg"))
                    + num_cell(last.get("round"), "round", "d", run=i, kind="final")
                    + num_cell(last.get("val_accuracy"), "val_accuracy", run=i, round=last.get("round"), kind="final")
                    + num_cell(last.get("val_loss"), "val_loss", run=i, round=last.get("round"), kind="final")
                    + num_cell(sum(times) / len(times) if times else None, "mean_round_s", ".3f", run=i) + "</tr>")
    return ("<h2>Runs compared</h2>" + figure(figs[("compare_runs", -1)], "runs compared")
            + table(["run", "strategy", "rounds", "final val_accuracy", "final val_loss", "mean round s"], rows,
                    "compare", left=2))


def render(runs: Sequence[RunData]) -> str:
    names = ", ".join(r.name for r in runs)
    toc = "".join(f'<li><a href="#run-{i}">{esc(r.name)}</a> <span class="muted">{esc(r.path.resolve())}</span></li>'
                  for i, r in enumerate(runs))
    body = [f"<h1>hpcfl report: {esc(names)}</h1>",
            f'<p class="muted">written {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} by hpcfl report</p>',
            f"<ul>{toc}</ul>"]
    figs = draw_figures(runs)
    body += [comparison(runs, figs)] + [run_section(r, i, figs) for i, r in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>hpcfl report: {esc(names)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head>\n"
            "<body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n")


def write_report(run_dirs: Sequence[Any], output: Optional[Any] = None) -> Path:
    """Read the run directories, write the HTML report (default ``<first run>/report.html``), return its path."""
    from ..atomic import write_atomic

    out = Path(output) if output else RunPaths(run_dirs[0]).report
    if output is not None and out.is_dir():
        raise RunDirError(f"{out}: is a directory (give the report's file name with -o)")
    if output is not None and not out.parent.is_dir():
        raise RunDirError(f"{out.parent}: no such directory for the report (-o {output})")
    runs: List[RunData] = []
    for d in run_dirs:
        run = load_run(Path(d))
        if not run.records and run.manifest is None:
            raise RunDirError(f"{d}: nothing to report yet (no metrics.jsonl records, no manifest.json)")
        runs.append(run)
    write_atomic(out, render(runs), error=RunDirError)
    return out
