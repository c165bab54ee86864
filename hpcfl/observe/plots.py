"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Pure functions of :class:`~hpcfl.observe.rundata.RunData`: a run directory's
parsed files in, an image out. matplotlib is imported on first use.
"""
from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import require
from .rundata import RunData
from .scalars import flatten

# Phases of a round stacked in the time plot, in the order they happen. train_s is split into its parts;
# what the parts do not cover is "train (other)". Time keys not listed here are added after these.
STACK = [("send_s", "send global model"), ("site_bcast_s", "in-site broadcast"), ("data_s", "train: data wait"),
         ("compute_s", "train: compute"), ("allreduce_s", "train: allreduce"), ("train_other_s", "train: other"),
         ("upload_s", "upload"), ("aggregate_s", "aggregate"), ("eval_s", "evaluate"), ("checkpoint_s", "checkpoint")]
NOT_STACKED = {"round_s", "overhead_s", "train_s", "site_train_s", "wait_upload_s", "wait_eval_s"}  # totals and waits, not phases
STATUS_COLOURS = {"returned": "#2ca02c", "not_sampled": "#c7c7c7", "dropout": "#d62728", "straggler": "#ff7f0e"}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    require("matplotlib", "pip install matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def site_colour(i: int) -> str:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    return palette[i % len(palette)]


def _num(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _series(recs: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in recs:
        v = _num(r.get(key))
        if v is not None:
            xs.append(int(r["round"]))
            ys.append(v)
    return xs, ys


def accuracy_loss(run: RunData) -> Optional[bytes]:
    """Validation accuracy and loss per site per round: the global model (solid), the site's locally tuned
    model (dashed), and the federation over all sites (black)."""
    rounds = run.rounds()
    if not rounds:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metric = site_metric(run)
    for ax, key, fed_key, label in ((axes[0], metric, f"val_{metric}", f"validation {metric.replace('_', ' ')}"),
                                    (axes[1], "loss", "val_loss", "validation loss")):
        for i, site in enumerate(run.sites()):
            for model, ls in (("global", "-"), ("local", "--")):
                recs = [r for r in run.site_records("val", model) if r.get("site") == site]
                xs, ys = _series(recs, key)
                if xs:
                    ax.plot(xs, ys, ls, marker="o", ms=3, color=site_colour(i),
                            label=f"{site} ({'global model' if model == 'global' else 'locally tuned'})")
        xs, ys = _series(rounds, fed_key)
        ax.plot(xs, ys, "-", color="black", lw=2, label="federation (all sites)")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{run.name}: validation per site per round")
    return _png(fig)


def time_stack(rounds: Sequence[Dict[str, Any]]) -> Tuple[List[int], List[str], Dict[str, List[float]]]:
    """(rounds, phases, seconds per phase and round) of the time breakdown: phases that add up to round_s,
    the rest of it as "other_s". Totals (train_s, site_train_s: the sum of the data, compute and
    allreduce phases and of their rest) are left out, or the bars would count them twice."""
    keys = [k for k, _ in STACK]
    labels = dict(STACK)
    extra = sorted({k for r in rounds for k in r["time"] if k not in labels and k not in NOT_STACKED
                    and _num(r["time"][k]) is not None})
    keys += extra
    xs = [int(r["round"]) for r in rounds]
    values: Dict[str, List[float]] = {k: [] for k in keys + ["other_s"]}
    for r in rounds:
        t = {k: _num(v) or 0.0 for k, v in r["time"].items()}
        t["train_other_s"] = max(0.0, t.get("train_s", 0.0) - t.get("data_s", 0.0) - t.get("compute_s", 0.0)
                                 - t.get("allreduce_s", 0.0))
        for k in keys:
            values[k].append(t.get(k, 0.0))
        stacked = sum(t.get(k, 0.0) for k in keys)
        values["other_s"].append(max(0.0, t.get("round_s", stacked) - stacked))
    return xs, keys, values


def time_breakdown(run: RunData) -> Optional[bytes]:
    """Stacked bars per round: where the round's wall time went; the rest of round_s is "other"."""
    rounds = [r for r in run.rounds() if isinstance(r.get("time"), dict)]
    if not rounds:
        return None
    plt = pyplot()
    labels = dict(STACK)
    xs, keys, values = time_stack(rounds)
    fig, ax = plt.subplots(figsize=(11, 4))
    bottom = [0.0] * len(xs)
    cmap = plt.get_cmap("tab20")
    for i, k in enumerate(keys + ["other_s"]):
        if not any(values[k]):
            continue
        ax.bar(xs, values[k], bottom=bottom, color=cmap(i % 20), label=labels.get(k, k if k != "other_s" else "other"))
        bottom = [b + v for b, v in zip(bottom, values[k])]
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_xticks(xs if len(xs) <= 30 else xs[::max(1, len(xs) // 30)])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{run.name}: where each round's time goes (round_s stacked)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def participation(run: RunData) -> Optional[bytes]:
    """Sites x rounds: returned, not sampled, dropped out, straggler."""
    recs = run.site_records("val", "global")
    sites = run.sites()
    rounds = sorted({int(r["round"]) for r in recs if isinstance(r.get("round"), int)})
    if not recs or not sites or not rounds:
        return None
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(STATUS_COLOURS)
    extra = sorted({str(r.get("status")) for r in recs if r.get("status") not in STATUS_COLOURS and r.get("status")})
    names += extra
    colours = list(STATUS_COLOURS.values()) + ["#9467bd"] * len(extra)
    grid = [[math.nan] * len(rounds) for _ in sites]
    for r in recs:
        if r.get("site") in sites and r.get("status"):
            grid[sites.index(r["site"])][rounds.index(int(r["round"]))] = names.index(str(r["status"]))
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * len(sites)))
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5,
              extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(sites) - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(len(sites)))
    ax.set_yticklabels(sites)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    present = {n for row in grid for n in row if not math.isnan(n)}
    ax.legend(handles=[Patch(color=colours[i], label=names[i]) for i in range(len(names)) if i in present],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{run.name}: participation")
    return _png(fig)


def site_metric(run: RunData) -> str:
    """The per-site metric drawn and tabled next to the loss: mean Dice for segmentation runs, else accuracy."""
    return "mean_dice" if any("val_mean_dice" in r for r in run.rounds()) else "accuracy"


def cross_site_metric(run: RunData) -> str:
    """The metric cross_site.json is shown by: the task's headline (mean_dice for segment), accuracy for
    files written before it was recorded."""
    return str((run.cross_site or {}).get("headline") or "accuracy")


def cross_site(run: RunData, metric: str = "") -> Optional[bytes]:
    """cross_site.json as a heatmap: rows = models (global, each site's final local model), columns = data."""
    metric = metric or cross_site_metric(run)
    doc = run.cross_site or {}
    models = doc.get("models") or {}
    if not models:
        return None
    plt = pyplot()
    rows = list(models)
    cols = sorted({s for m in models.values() for s in (m or {})}, key=lambda s: (run.sites() + [s]).index(s))
    grid = [[_num(((models[m] or {}).get(c) or {}).get(metric)) for c in cols] for m in rows]
    data = [[math.nan if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(data, cmap="viridis", vmin=0.0 if metric != "loss" else None, vmax=1.0 if metric != "loss" else None)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9,
                        color="white" if (metric == "loss" or v < 0.6) else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{m} model" for m in rows])
    ax.set_xlabel("validation data of")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{run.name}: cross-site {metric}")
    return _png(fig)


def dp_epsilon(run: RunData) -> Optional[bytes]:
    rounds = run.rounds()
    xs, ys = _series(rounds, "dp_epsilon")
    if not xs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, "-o", ms=3, color="#9467bd")
    delta = next((r.get("dp_delta") for r in rounds if r.get("dp_delta") is not None), None)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon" + (f" (delta = {delta:g})" if isinstance(delta, (int, float)) else ""))
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{run.name}: differential privacy budget spent")
    return _png(fig)


PLOTTED = {"val_accuracy", "val_loss", "local_val_accuracy", "local_val_loss", "dp_epsilon", "round", "timestamp",
           "sites_done", "sites_total"}


def varying_round_metrics(rounds: Sequence[Dict[str, Any]]) -> List[str]:
    """The numeric round fields not drawn elsewhere that change over the run: a constant (retries 0, the
    number of training samples) says nothing as a curve."""
    seen: Dict[str, set] = {}
    for r in rounds:
        for k, v in flatten({k: v for k, v in r.items() if k not in PLOTTED and k != "time"}):
            seen.setdefault(k, set()).update([v] if math.isfinite(v) else [])
    return [k for k, vs in seen.items() if len(vs) > 1 or (len(rounds) == 1 and vs)]


def other_round_metrics(run: RunData, limit: int = 24) -> Optional[bytes]:
    """Every other numeric field of the round records (a new task's metrics appear here untouched): small multiples."""
    rounds = run.rounds()
    keys = varying_round_metrics(rounds)[:limit]
    if not keys:
        return None
    plt = pyplot()
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.9 * ncol, 2.2 * nrow), squeeze=False)
    for ax, key in zip([a for row in axes for a in row], keys):
        xs, ys = [], []
        for r in rounds:
            v = dict(flatten(r)).get(key)
            if v is not None and math.isfinite(v):
                xs.append(int(r["round"]))
                ys.append(v)
        ax.plot(xs, ys, "-o", ms=2)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in [a for row in axes for a in row][len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{run.name}: other per-round metrics", fontsize=10)
    # fixed spacing, not tight_layout: it measures every text of every small axes (0.5 s for 9 of them)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.35 / (2.2 * nrow), top=1 - 0.55 / (2.2 * nrow),
                        wspace=0.4, hspace=0.55)
    return _png(fig)


def compare_runs(runs: Sequence[RunData]) -> Optional[bytes]:
    """Several runs overlaid: the federation's validation accuracy and loss (solid), locally tuned (dashed)."""
    if len(runs) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, run in enumerate(runs):
        rounds = run.rounds()
        c = site_colour(i)
        for ax, key in ((axes[0], "val_accuracy"), (axes[1], "val_loss")):
            xs, ys = _series(rounds, key)
            ax.plot(xs, ys, "-", marker=MARKERS[i % len(MARKERS)], ms=3, color=c, label=f"{run.name}")
            xs, ys = _series(rounds, "local_" + key)
            if xs:
                ax.plot(xs, ys, "--", color=c, alpha=0.7, label=f"{run.name} (locally tuned)")
        xs = [int(r["round"]) for r in rounds if isinstance(r.get("time"), dict) and _num(r["time"].get("round_s"))]
        ys = [float(r["time"]["round_s"]) for r in rounds if isinstance(r.get("time"), dict)
              and _num(r["time"].get("round_s"))]
        axes[2].plot(xs, ys, "-", marker=MARKERS[i % len(MARKERS)], ms=3, color=c, label=run.name)
    for ax, label in zip(axes, ("validation accuracy", "validation loss", "round wall time (s)")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    fig.suptitle("runs compared")
    return _png(fig)
