#!/usr/bin/env python
"""Aggregation strategies and privacy options of hpcfl on one non-IID federation, in one run.

The federation: configs/digits-2x2.yaml (scikit-learn's digits and an MLP;
the model and local training settings are the file's, printed at the top of
the output) with 4 sites of 1 rank each, the samples split over the sites with label skew
Dirichlet(alpha) (default alpha = 0.1: most sites hold a few classes only),
each site's part split 80/20 into train/validation, a fixed seed, and
R rounds (default 30). Cross-site evaluation at the end is switched off
(eval.cross_site=false): only the rounds are measured. Every configuration is
launched as a user launches it, ``python -m hpcfl launch configs/digits-2x2.yaml
--set ...`` (mpirun, aggregator + 4 site ranks), one after the other, and read
back from its run directory (metrics.jsonl, summary.json).

Table 1, strategies (no privacy option): FedAvg; FedProx (proximal mu, --mu);
FedAvgM (server lr --avgm-lr, momentum --avgm-momentum); FedAdam (server lr
--adam-lr; also used for FedYogi/FedAdagrad). --all adds FedYogi, FedAdagrad
and the robust rules median, trimmed_mean and krum. Columns:

  final acc     val_accuracy of the global model after the last round (all
                sites' validation splits pooled: correct / count)
  best acc      the best val_accuracy of any round, and its round
  rounds to T   the first round whose val_accuracy >= --target
  round s       mean round wall time (time.round_s) over rounds 2..R: round 1
                also pays one-time warm-up and is left out
  overhead ms   mean time.overhead_s over rounds 2..R: round time beyond the
                slowest site's local training (sending, aggregating, evaluating),
                as hpcfl clamps it at 0: sites start the next round's training
                while rank 0 still logs and checkpoints, so a round can be
                shorter than its training, and 0 means the protocol's cost was
                hidden behind training

Table 2, privacy options, each on top of FedAvg: none (FedAvg as is: the
same run as Table 1's fedavg row when both tables are run); exclude_vars (the
output layer never leaves the site: each site keeps its own, so the global
model is evaluated with each site's own output layer); percentile (share the
largest --percent % of each update, clipped to [-gamma, gamma]); dp (DP-FedAvg:
each site's update clipped to L2 norm --clip, Gaussian noise on the sum, with
the noise multiplier z chosen here, by bisection on hpcfl.privacy.dp.epsilon,
so that epsilon after R rounds is --epsilon at --delta, at the sample rate
hpcfl's accountant uses: sites sampled per round / sites, 1 here as all sites
take part every round); secagg (pairwise-masked fixed-point uploads,
rank 0 learns only the sum). Columns:

  final acc     as above
  round s       as above
  agg+upload ms mean of time.aggregate_s + time.upload_s over rounds 2..R:
                where the privacy options do their work (the site's filter,
                clipping, masking and the upload; the server's unmasking,
                noise and aggregation)
  vs none       round s / round s of `none`, both measured in this run
  epsilon       dp_epsilon reported by the run's last round (DP only)

Note that user-level DP with 4 users is a hard regime: the noise on the sum
has std z * clip over a handful of clipped updates, so the dp row shows what
a given epsilon costs in accuracy here, not what DP-FedAvg reaches with many
sites.

All runs are measured in the same invocation, sequentially; with --repeats N
the whole list is run N times, interleaved (run 1 of every configuration,
then run 2, ...), and the times are medians over the repeats (accuracies are
from the first repeat; a changed accuracy between repeats is reported).
Other load on the machine makes timings noisy: compare within one run.

    .venv/bin/python bench/algorithms.py [--rounds 30] [--target 0.85] [--all] [--repeats 1]
                                         [--only fedavg,fedprox,...,none,exclude_vars,percentile,dp,secagg]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits-2x2.yaml"

STRATEGIES = ["fedavg", "fedprox", "fedavgm", "fedadam"]
MORE_STRATEGIES = ["fedyogi", "fedadagrad", "median", "trimmed_mean", "krum"]
PRIVACY = ["none", "exclude_vars", "percentile", "dp", "secagg"]


def base_sets(args) -> List[str]:
    return [f"sites={{count: {args.sites}, ranks: 1}}", "data.partition=dirichlet",
            f"data.dirichlet_alpha={args.alpha}", f"fl.rounds={args.rounds}", f"run.seed={args.seed}",
            "eval.cross_site=false"]


def federation_config(args):
    sys.path.insert(0, str(ROOT))
    from hpcfl.config import load_config

    return load_config(ROOT / CONFIG, base_sets(args))


def describe(cfg) -> str:
    t, m = cfg.train, cfg.model
    epochs, steps = cfg.site_local(cfg.sites[0])
    local = f"{epochs} local epoch(s)" if epochs else f"{steps} local step(s)"
    return (f"{cfg.data.name}, val_fraction {cfg.data.val_fraction:g}; model {m.name} hidden {list(m.hidden)}; "
            f"{t.optimizer} lr {t.lr:g} momentum {t.momentum:g} batch {t.batch_size}, {local} per round")


def output_layer_pattern(cfg) -> str:
    """A regex for the output layer's parameters, from the model this config builds (hpcfl's own builder)."""
    import torch.nn as nn

    from hpcfl.model import build_model

    if cfg.model.name != "mlp":
        sys.exit(f"{CONFIG}: model.name is {cfg.model.name!r}; pass --exclude REGEX for its output layer")
    model = build_model(cfg, 64, 10, (64,))  # digits: 8x8 = 64 features, 10 classes
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return "^" + last.replace(".", r"\.") + r"\."


def sample_rate(cfg) -> float:
    """The sample rate hpcfl's DP accountant uses (hpcfl/federation.py: sites sampled per round / sites)."""
    from hpcfl.participation import sample_size

    k = len(cfg.sites)
    return sample_size(cfg.fl.sampling.fraction, cfg.fl.sampling.min_sites, k) / k


def noise_for_epsilon(eps: float, rounds: int, delta: float, q: float) -> Tuple[float, float]:
    """The noise multiplier z whose epsilon after `rounds` rounds at sample rate q is `eps` (bisection)."""
    from hpcfl.privacy.dp import epsilon

    lo, hi = 0.05, 1.0
    while epsilon(hi, q, rounds, delta) > eps:  # epsilon falls as z grows
        lo, hi = hi, hi * 2
        if hi > 1e4:
            sys.exit(f"no noise multiplier reaches epsilon {eps} after {rounds} rounds")
    if epsilon(lo, q, rounds, delta) <= eps:
        sys.exit(f"epsilon {eps} is reached with almost no noise (z <= {lo}); ask for a smaller --epsilon")
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        if epsilon(mid, q, rounds, delta) > eps:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return hi, epsilon(hi, q, rounds, delta)  # hi: epsilon <= target


def configurations(args, names: List[str]) -> Dict[str, List[str]]:
    """Run key -> --set overrides beyond the base ones; `none` is the fedavg run."""
    sl = f"fl.server.lr={args.adam_lr}"
    strat = {
        "fedavg": ["fl.strategy=fedavg"],
        "fedprox": ["fl.strategy=fedprox", f"fl.proximal_mu={args.mu}"],
        "fedavgm": ["fl.strategy=fedavgm", f"fl.server.lr={args.avgm_lr}", f"fl.server.momentum={args.avgm_momentum}"],
        "fedadam": ["fl.strategy=fedadam", sl],
        "fedyogi": ["fl.strategy=fedyogi", sl],
        "fedadagrad": ["fl.strategy=fedadagrad", sl],
        "median": ["fl.strategy=median"],
        "trimmed_mean": ["fl.strategy=trimmed_mean", f"fl.robust.trim_fraction={args.trim}"],
        "krum": ["fl.strategy=krum", "fl.robust.byzantine=0"],
    }
    out: Dict[str, List[str]] = {}
    for n in names:
        if n in strat:
            out[n] = strat[n]
        elif n == "none":
            out["fedavg"] = strat["fedavg"]
        elif n == "exclude_vars":
            out[n] = ["fl.strategy=fedavg", f"privacy.exclude_vars=[{json.dumps(args.exclude)}]"]
        elif n == "percentile":
            out[n] = ["fl.strategy=fedavg", f"privacy.percentile={{percent: {args.percent}, gamma: {args.gamma}}}"]
        elif n == "dp":
            out[n] = ["fl.strategy=fedavg", f"privacy.dp={{noise_multiplier: {args.z:.6g}, clip_norm: {args.clip}, "
                                            f"delta: {args.delta}}}"]
        elif n == "secagg":
            out[n] = ["fl.strategy=fedavg", "privacy.secure_aggregation=true"]
    return out


def launch(root: Path, name: str, sets: List[str]) -> Dict[str, Any]:
    argv = [sys.executable, "-m", "hpcfl", "launch", CONFIG, "--set", f"run.root={root}", "--set", f"run.name={name}"]
    for s in sets:
        argv += ["--set", s]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"benchmark run {name} failed ({shlex.join(argv)}):\n{r.stdout}\n{r.stderr}")
    recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [x for x in recs if x.get("kind") == "round"]
    summary = json.loads((root / name / "summary.json").read_text())
    if not rounds:
        sys.exit(f"benchmark run {name}: no round records in {root / name / 'metrics.jsonl'}")
    steady = rounds[1:] or rounds
    mean = lambda f: statistics.fmean(f(x["time"]) for x in steady)  # noqa: E731
    return {
        "wall_s": wall,
        "acc": [x["val_accuracy"] for x in rounds],
        "final_acc": summary["final"]["val_accuracy"],
        "round_s": mean(lambda t: t["round_s"]),
        "overhead_s": mean(lambda t: t["overhead_s"]),
        "agg_upload_s": mean(lambda t: t["aggregate_s"] + t["upload_s"]),
        "train_s": mean(lambda t: t["train_s"]),
        "epsilon": rounds[-1].get("dp_epsilon"),
        "rounds": len(rounds),
    }


def fmt_acc(x: float) -> str:
    return f"{x:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--target", type=float, default=0.85, help="target val_accuracy for 'rounds to target'")
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label-skew concentration")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="also fedyogi, fedadagrad, median, trimmed_mean, krum")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(STRATEGIES + MORE_STRATEGIES + PRIVACY))
    ap.add_argument("--repeats", type=int, default=1, help="run each configuration N times; times are medians")
    ap.add_argument("--mu", type=float, default=0.1, help="fedprox: proximal mu")
    ap.add_argument("--avgm-lr", type=float, default=1.0, help="fedavgm: server lr")
    ap.add_argument("--avgm-momentum", type=float, default=0.9, help="fedavgm: server momentum")
    ap.add_argument("--adam-lr", type=float, default=0.01, help="fedadam/fedyogi/fedadagrad: server lr")
    ap.add_argument("--trim", type=float, default=0.25, help="trimmed_mean: trim fraction (0.25 of 4 sites = 1 each end)")
    ap.add_argument("--exclude", default="", help="exclude_vars regex (default: the MLP's output layer)")
    ap.add_argument("--percent", type=float, default=10.0, help="percentile: percent of the update shared")
    ap.add_argument("--gamma", type=float, default=0.01, help="percentile: clip of shared values")
    ap.add_argument("--epsilon", type=float, default=8.0, help="dp: epsilon after all rounds")
    ap.add_argument("--delta", type=float, default=1e-5, help="dp: delta")
    ap.add_argument("--clip", type=float, default=1.0, help="dp: clip norm C")
    ap.add_argument("--out", default="", help="parent of the run directories (default: a new temp dir)")
    args = ap.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1")

    known = STRATEGIES + MORE_STRATEGIES + PRIVACY
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad:
            ap.error(f"--only: unknown {', '.join(bad)} (known: {', '.join(known)})")
    else:
        names = STRATEGIES + (MORE_STRATEGIES if args.all else []) + PRIVACY
    strat_rows = [n for n in STRATEGIES + MORE_STRATEGIES if n in names]
    priv_rows = [n for n in PRIVACY if n in names]

    cfg = federation_config(args)
    if "exclude_vars" in names and not args.exclude:
        args.exclude = output_layer_pattern(cfg)
    args.z = args.eps_planned = None
    q = sample_rate(cfg)
    if "dp" in names:
        args.z, args.eps_planned = noise_for_epsilon(args.epsilon, args.rounds, args.delta, q)

    print("command: " + shlex.join([Path(sys.executable).name, *[os.path.relpath(sys.argv[0], ROOT)], *sys.argv[1:]]))
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}); "
          f"all runs below are measured in this same invocation, one after the other, "
          f"{args.repeats} run(s) per configuration" + (" (times: median)" if args.repeats > 1 else ""))
    print(f"federation: {CONFIG} with {shlex.join(sum((['--set', s] for s in base_sets(args)), []))}")
    print(f"  = {describe(cfg)}")
    if args.z is not None:
        print(f"dp: noise multiplier z = {args.z:.4f} gives epsilon {args.eps_planned:.3f} after {args.rounds} rounds "
              f"(delta {args.delta:g}, sample rate {q:g}; hpcfl.privacy.dp.epsilon), clip norm {args.clip:g}")
    if "exclude_vars" in names:
        print(f"exclude_vars: {args.exclude} (regex; re.search on parameter names)")
    print(flush=True)

    confs = configurations(args, names)
    root = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="hpcfl-bench-algorithms-"))
    root.mkdir(parents=True, exist_ok=True)
    results: Dict[str, List[Dict[str, Any]]] = {k: [] for k in confs}
    t_all = time.perf_counter()
    for rep in range(args.repeats):
        for key, sets in confs.items():
            name = f"{key}-r{rep + 1}"
            res = launch(root, name, base_sets(args) + sets)
            results[key].append(res)
            print(f"  ran {name}: {res['rounds']} rounds, final val_accuracy {res['final_acc']:.4f}, "
                  f"{res['round_s']:.3f} s/round, {res['wall_s']:.1f} s end to end", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all

    def agg(key: str) -> Dict[str, Any]:
        rs = results[key]
        first = rs[0]
        med = {k: statistics.median(r[k] for r in rs) for k in ("round_s", "overhead_s", "agg_upload_s", "wall_s")}
        changed = any(r["acc"] != first["acc"] for r in rs[1:])
        return {**first, **med, "acc_changed": changed}

    A = {k: agg(k) for k in confs}
    notes = []
    for k, a in A.items():
        if a["acc_changed"]:
            notes.append(f"{k}: val_accuracy differed between repeats (first repeat shown)")

    if strat_rows:
        print(f"\nStrategies: {args.sites} sites, Dirichlet alpha {args.alpha:g}, {args.rounds} rounds, seed {args.seed}, "
              f"target val_accuracy {args.target:g}\n")
        print("| strategy | settings | final acc | best acc (round) | rounds to target | round s | overhead ms |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for n in strat_rows:
            a = A[n]
            best = max(a["acc"])
            reach = next((i + 1 for i, x in enumerate(a["acc"]) if x >= args.target), None)
            settings = ", ".join(s.partition("=")[0].split(".")[-1] + "=" + s.partition("=")[2]
                                 for s in confs[n] if not s.startswith("fl.strategy=")) or "-"
            print(f"| {n} | {settings} | {fmt_acc(a['final_acc'])} | {fmt_acc(best)} ({a['acc'].index(best) + 1}) | "
                  f"{reach if reach else 'not reached'} | {a['round_s']:.3f} | {a['overhead_s'] * 1e3:.1f} |")

    if priv_rows:
        print(f"\nPrivacy options on FedAvg: same federation; round times are means over rounds 2..{args.rounds}\n")
        print("| option | settings | final acc | round s | agg+upload ms | vs none | epsilon |")
        print("|---|---|---:|---:|---:|---:|---:|")
        ref = A["fedavg"]["round_s"] if "fedavg" in A else None
        for n in priv_rows:
            key = "fedavg" if n == "none" else n
            a = A[key]
            settings = {"none": "-", "exclude_vars": f"exclude_vars={args.exclude}",
                        "percentile": f"percent={args.percent:g}, gamma={args.gamma:g}",
                        "dp": f"z={args.z:.4g}, clip={args.clip:g}, delta={args.delta:g}" if args.z else "",
                        "secagg": "frac_bits=24 (default)"}[n]
            ratio = f"{a['round_s'] / ref:.2f}" if ref else "n/a"
            eps = f"{a['epsilon']:.3f}" if a["epsilon"] is not None else "-"
            print(f"| {n} | {settings} | {fmt_acc(a['final_acc'])} | {a['round_s']:.3f} | "
                  f"{a['agg_upload_s'] * 1e3:.2f} | {ratio} | {eps} |")
        if ref is None:
            print("\n(vs none: not measured; run `none` too)")
        if "none" in priv_rows and "fedavg" in strat_rows:
            print("\n(`none` is the same run as the fedavg strategy row)")

    for n in notes:
        print(f"note: {n}")
    print(f"\n{sum(len(v) for v in results.values())} runs, {total:.0f} s in all; runs kept in {root}")


if __name__ == "__main__":
    main()
