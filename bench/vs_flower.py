#!/usr/bin/env python
"""hpcfl next to Flower's simulation engine on the same federation, in one run.

The federation is the project's fast one, configs/digits.yaml: scikit-learn's
bundled digits (1,797 8x8 images, pixels / 16) split IID over 2 sites, each
site's part split 80/20 into train/validation; an MLP Flatten -> Linear(64,64)
-> ReLU -> Linear(64,10); per round every site trains 1 local epoch of SGD
(lr 0.1, momentum 0.9, batch 32, fresh optimizer state each round) from the
global model, the server averages the results weighted by training samples
(FedAvg), and the new global model is evaluated on every site's validation
split (federated evaluation). 10 rounds, both sites every round.

(a) hpcfl, as a user runs it: ``python -m hpcfl launch configs/digits.yaml``
    (mpirun, 3 ranks: aggregator + 2 sites of 1 rank, 1 torch thread each).
    Per-round times come from its metrics.jsonl.
(b) Flower (flwr[simulation], Message API): ``flwr.simulation.run_simulation``
    with a ServerApp running ``flwr.serverapp.strategy.FedAvg.start`` and a
    ClientApp with ``@train``/``@evaluate``, on the Ray backend, 2 virtual
    SuperNodes with 1 CPU each (``client_resources={"num_cpus": 1}``, Ray given
    the machine's 2 cores; torch 1 thread per client). It runs in a separate
    process under .bench-venv/bin/python so Flower's dependencies stay out of
    the project's .venv.

Both sides do the same work on the same samples in the same order: the Flower
side reads the federation's settings from configs/digits.yaml (through hpcfl's
own config loader, in this process) and reproduces hpcfl's seeded IID
partition, train/val split and per-round shuffles (hpcfl/data.py: partition,
train_val_split, epoch_shard) and its seeded initial weights
(torch.manual_seed(seed) before building the model), so the two federations
follow the same trajectory and should reach the same accuracy up to float
rounding. Where the two differ, the difference is each framework's own way:
Flower's server sends the global model to the clients twice per round (once
with the train message, once with the evaluate message; hpcfl sends it once and
sites evaluate what they received); its ClientApp is stateless, so each message
builds a fresh model and loads the received arrays into it; and its in-memory
Grid polls for replies every 0.1 s (InMemoryGrid's pull_interval, which
run_simulation does not expose), twice per round. hpcfl does more work than
Flower in one respect: it writes a checkpoint every round (checkpoint.every
defaults to 1; it overlaps the next round's training); Flower writes none.
Flower's clients keep the dataset in a per-process cache (loaded once per Ray
actor, as hpcfl loads it once per rank). Flower's and Ray's telemetry are
switched off (FLWR_TELEMETRY_ENABLED=0, RAY_USAGE_STATS_ENABLED=0): there is no
network.

Measured, for each side:
  total      wall time of the whole command/process, start-up and teardown
             included (time.perf_counter around subprocess.run, in this process)
  round      per-round wall time at the server: from the end of the previous
             round (for round 1: the start of round 1) to the end of this round's
             evaluation. hpcfl: metrics.jsonl time.round_s. Flower: timestamps
             taken in a FedAvg subclass, at the first configure_train call and at
             the end of each aggregate_evaluate.
  train      local training of the slowest site in that round, timed inside the
             site (hpcfl: time.train_s; Flower: timed in the ClientApp's train
             function around the optimizer's creation and the epoch loop, i.e.
             excluding message decoding and model construction).
  overhead   max(0, round - train), hpcfl's own definition (its overhead_s):
             everything a round costs beyond local training (sending and
             receiving models, aggregation, evaluation, scheduling). hpcfl's
             sites start the next round's training while rank 0 still logs and
             checkpoints, so an hpcfl round can be shorter than its training;
             clamping at 0 can only overstate hpcfl's overhead. Flower's rounds
             never overlap, so the clamp never changes its numbers.
  start-up   total - sum(round): process start, imports, job/cluster start-up,
             data loading, teardown.
  accuracy   validation accuracy of the final global model over both sites'
             validation splits (correct / count, summed over sites).
Round 1 also pays one-time costs: on both sides first-call warm-up, and for
Flower also its Ray actors' lazy start-up (each actor imports the ClientApp's
module, torch and scikit-learn and loads the data on its first message; hpcfl's
ranks do that before round 1). So round 1 is shown apart, and medians of rounds
2..N next to the means.

    .venv/bin/python bench/vs_flower.py            # needs .bench-venv with flwr
    .venv/bin/python bench/vs_flower.py --install  # creates .bench-venv first

Other load on the machine makes timings noisy: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venv"
REQS = ROOT / "bench" / "requirements-flower.txt"
CONFIG = "configs/digits.yaml"
INSTALL_CMD = "python3 -m venv .bench-venv && .bench-venv/bin/pip install -r bench/requirements-flower.txt"


# ---------------------------------------------------------------------------
# The federation, read from configs/digits.yaml (runs under the project's venv)
# ---------------------------------------------------------------------------

def federation_spec() -> Dict[str, Any]:
    """The settings the Flower side needs, from the same config file hpcfl runs, via hpcfl's loader;
    refuses any setting the Flower side does not reproduce."""
    sys.path.insert(0, str(ROOT))
    from hpcfl.config import load_config

    cfg = load_config(ROOT / CONFIG)
    epochs_steps = {cfg.site_local(s) for s in cfg.sites}
    unsupported = {
        "data.name must be digits": cfg.data.name != "digits",
        "data.partition must be iid": cfg.data.partition != "iid",
        "model must be mlp without batchnorm": cfg.model.name != "mlp" or cfg.model.batchnorm,
        "train.optimizer must be sgd without weight decay": cfg.train.optimizer != "sgd" or cfg.train.weight_decay,
        "fl.strategy must be fedavg": cfg.fl.strategy != "fedavg",
        "every site must have 1 rank and no overrides": any(
            s.ranks != 1 or any(v is not None for v in vars(s.overrides).values()) for s in cfg.sites),
        "all sites must train the same whole epochs": len(epochs_steps) != 1 or next(iter(epochs_steps))[1] is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        sys.exit(f"{CONFIG}: the Flower side does not reproduce this config: {'; '.join(bad)}")
    return {"seed": cfg.run.seed, "rounds": cfg.fl.rounds, "clients": len(cfg.sites),
            "val_fraction": cfg.data.val_fraction, "hidden": list(cfg.model.hidden),
            "epochs": next(iter(epochs_steps))[0], "lr": cfg.train.lr, "momentum": cfg.train.momentum,
            "batch_size": cfg.train.batch_size, "eval_batch_size": cfg.train.eval_batch_size}


# ---------------------------------------------------------------------------
# (b) Flower side: runs under .bench-venv/bin/python, imported as module
# `vs_flower` (not __main__) so Ray's worker processes can import the ClientApp's
# functions by name and keep the per-process data cache between messages.
# ---------------------------------------------------------------------------

_CLIENT: Dict[str, Any] = {}  # per Ray actor process: the spec, data tensors, splits


def _split(spec: Dict[str, Any], n: int, site: int):
    """hpcfl.data.partition(iid) + train_val_split, reproduced exactly (same seeds, same calls)."""
    import numpy as np

    seed, k = spec["seed"], spec["clients"]
    parts = [np.sort(p) for p in np.array_split(np.random.default_rng([seed, 11]).permutation(n), k)]
    perm = np.random.default_rng([seed, 13, site]).permutation(parts[site])
    n_val = min(max(1, int(round(len(perm) * spec["val_fraction"]))), len(perm) - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _epoch_order(spec: Dict[str, Any], train, site: int, round_: int, epoch: int):
    """hpcfl.data.epoch_shard for a 1-rank site: the site's shuffle of its training samples."""
    import numpy as np

    return np.random.default_rng([spec["seed"], 17, site, round_, epoch]).permutation(train)


def _build_model(spec: Dict[str, Any]):
    import torch.nn as nn

    layers: List[Any] = [nn.Flatten()]
    width = 64
    for h in spec["hidden"]:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _client_data(context) -> Dict[str, Any]:
    """Load the digits and this client's split once per process (Ray actors are long-lived)."""
    pid = int(context.node_config["partition-id"])
    if pid not in _CLIENT.get("sites", {}):
        import numpy as np
        import torch
        from sklearn.datasets import load_digits

        torch.set_num_threads(1)  # 1 CPU per client, as Ray was told
        if "x" not in _CLIENT:
            _CLIENT["spec"] = json.loads(os.environ["VS_FLOWER_SPEC"])
            d = load_digits()
            _CLIENT["x"] = torch.from_numpy((d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
            _CLIENT["y"] = torch.from_numpy(d.target.astype(np.int64))
            _CLIENT["sites"] = {}
        _CLIENT["sites"][pid] = _split(_CLIENT["spec"], len(_CLIENT["y"]), pid)
    return {"pid": pid, "spec": _CLIENT["spec"], "x": _CLIENT["x"], "y": _CLIENT["y"],
            "train": _CLIENT["sites"][pid][0], "val": _CLIENT["sites"][pid][1]}


def client_train(msg, context):
    """ClientApp @train: local epochs of SGD from the received global model."""
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    d = _client_data(context)
    spec, pid = d["spec"], d["pid"]
    round_ = int(msg.content["config"]["server-round"])
    model = _build_model(spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])  # fresh every round
    model.train()
    bs, loss_sum, seen = spec["batch_size"], 0.0, 0
    for epoch in range(spec["epochs"]):
        order = torch.from_numpy(_epoch_order(spec, d["train"], pid, round_, epoch))
        for b in range(0, len(order), bs):
            idx = order[b:b + bs]
            opt.zero_grad()
            loss = F.cross_entropy(model(d["x"][idx]), d["y"][idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
    train_s = time.perf_counter() - t0

    metrics = MetricRecord({"train_loss": loss_sum / max(seen, 1), "train_s": train_s,
                            "num-examples": int(len(d["train"]))})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


def client_evaluate(msg, context):
    """ClientApp @evaluate: the received global model on this client's validation split."""
    import torch
    import torch.nn.functional as F
    from flwr.app import Message, MetricRecord, RecordDict

    d = _client_data(context)
    model = _build_model(d["spec"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.eval()
    val, bs = torch.from_numpy(d["val"]), d["spec"]["eval_batch_size"]
    loss_sum = correct = 0.0
    with torch.no_grad():
        for b in range(0, len(val), bs):
            idx = val[b:b + bs]
            out, y = model(d["x"][idx]), d["y"][idx]
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
    n = int(len(val))
    metrics = MetricRecord({"eval_loss": loss_sum / n, "eval_acc": correct / n, "correct": correct, "num-examples": n})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def flower_worker(out_path: str) -> None:
    """The Flower process: run the simulation, write per-round records to out_path (JSON)."""
    import logging

    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    spec = json.loads(os.environ["VS_FLOWER_SPEC"])
    torch.set_num_threads(1)
    records: List[Dict[str, Any]] = []

    class TimedFedAvg(FedAvg):
        """FedAvg, plus round timestamps and the clients' training times."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.t_prev = None
            self.train_s: Dict[int, float] = {}

        def configure_train(self, server_round, arrays, config, grid):
            if self.t_prev is None:
                self.t_prev = time.perf_counter()  # start of round 1
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            if len(ok) != spec["clients"]:
                raise RuntimeError(f"round {server_round}: {len(ok)} of {spec['clients']} clients trained: "
                                   + "; ".join(m.error.reason for m in replies if m.has_error()))
            self.train_s[server_round] = max(float(m.content["metrics"]["train_s"]) for m in ok)
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            if len(ok) != spec["clients"]:
                raise RuntimeError(f"round {server_round}: {len(ok)} of {spec['clients']} clients evaluated: "
                                   + "; ".join(m.error.reason for m in replies if m.has_error()))
            out = super().aggregate_evaluate(server_round, replies)
            correct = sum(float(m.content["metrics"]["correct"]) for m in ok)
            count = sum(int(m.content["metrics"]["num-examples"]) for m in ok)
            now = time.perf_counter()
            records.append({"round": server_round, "round_s": now - self.t_prev, "train_s": self.train_s[server_round],
                            "val_accuracy": correct / count})
            self.t_prev = now
            return out

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        torch.manual_seed(spec["seed"])  # the same initial weights as hpcfl's aggregator
        initial = ArrayRecord(_build_model(spec).state_dict())
        n = spec["clients"]
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                               min_evaluate_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec["rounds"],
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())

    client_app = ClientApp()
    client_app.train()(client_train)
    client_app.evaluate()(client_evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=spec["clients"],
                   backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "num_gpus": 0,
                                                 "logging_level": logging.WARNING}})
    if len(records) != spec["rounds"]:
        raise SystemExit(f"flower: {len(records)} of {spec['rounds']} rounds completed")
    Path(out_path).write_text(json.dumps(records))


# ---------------------------------------------------------------------------
# Orchestration: runs under the project's .venv
# ---------------------------------------------------------------------------

def bench_python() -> Path:
    return VENV / "bin" / "python"


def has_flower(py: Path) -> bool:
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-c", "import flwr, flwr.simulation, ray, torch, sklearn"], capture_output=True)
    return r.returncode == 0


def install() -> None:
    base = shutil.which("python3") or sys.executable
    print(f"creating {VENV} from {REQS} ...", flush=True)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(bench_python()), "-m", "pip", "install", "-q", "-r", str(REQS)], check=True)


def run_hpcfl(tmp: Path) -> Dict[str, Any]:
    argv = [sys.executable, "-m", "hpcfl", "launch", CONFIG, "--set", f"run.root={tmp}", "--set", "run.name=digits"]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    total = time.perf_counter() - t
    (tmp / "hpcfl.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"hpcfl run failed (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    recs = [json.loads(x) for x in (tmp / "digits" / "metrics.jsonl").read_text().splitlines()]
    json.loads((tmp / "digits" / "summary.json").read_text())  # present and well-formed
    rounds = [{"round": x["round"], "round_s": x["time"]["round_s"], "train_s": x["time"]["train_s"],
               "val_accuracy": x["val_accuracy"]} for x in recs if x["kind"] == "round"]
    return {"total_s": total, "rounds": rounds}


def run_flower(tmp: Path, spec: Dict[str, Any]) -> Dict[str, Any]:
    out = tmp / "flower-rounds.json"
    env = dict(os.environ, VS_FLOWER_SPEC=json.dumps(spec), PYTHONPATH=str(ROOT / "bench"),
               FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp / "ray"))
    (tmp / "ray").mkdir()
    argv = [str(bench_python()), str(Path(__file__).resolve()), "--flower-worker", str(out)]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp, env=env)
    total = time.perf_counter() - t
    (tmp / "flower.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0 or not out.exists():
        sys.exit(f"flower run failed (exit {r.returncode}); log {tmp / 'flower.log'}:\n{r.stdout[-4000:]}\n"
                 f"{r.stderr[-4000:]}")
    return {"total_s": total, "rounds": json.loads(out.read_text())}


def overhead(r: Dict[str, Any]) -> float:
    return max(0.0, r["round_s"] - r["train_s"])


def stats(res: Dict[str, Any]) -> Dict[str, float]:
    rounds = res["rounds"]
    later = rounds[1:] or rounds
    return {
        "total_s": res["total_s"],
        "startup_s": res["total_s"] - sum(r["round_s"] for r in rounds),
        "round1_ms": 1e3 * rounds[0]["round_s"],
        "round_med_ms": 1e3 * statistics.median(r["round_s"] for r in later),
        "round_ms": 1e3 * statistics.mean(r["round_s"] for r in rounds),
        "train_ms": 1e3 * statistics.mean(r["train_s"] for r in rounds),
        "over_ms": 1e3 * statistics.mean(overhead(r) for r in rounds),
        "over_med_ms": 1e3 * statistics.median(overhead(r) for r in later),
        "acc": rounds[-1]["val_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", action="store_true", help=f"create {VENV.name} from {REQS.name} if it lacks Flower")
    ap.add_argument("--keep", action="store_true", help="keep the run directory and logs")
    ap.add_argument("--flower-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.flower_worker:  # inside .bench-venv: run Flower from the importable module, not __main__
        import vs_flower

        vs_flower.flower_worker(args.flower_worker)
        return

    if not has_flower(bench_python()):
        if not args.install:
            print(f"{VENV} has no Flower simulation engine. Create it with (from {ROOT}):\n\n    {INSTALL_CMD}\n\n"
                  f"or run this script with --install.", file=sys.stderr)
            sys.exit(2)
        install()
        if not has_flower(bench_python()):
            sys.exit(f"{VENV}: Flower still not importable after installing {REQS}")

    spec = federation_spec()
    flwr_version = subprocess.run([str(bench_python()), "-c", "import flwr, ray, torch; "
                                   "print(flwr.__version__, ray.__version__, torch.__version__)"],
                                  capture_output=True, text=True, check=True).stdout.split()
    tmp = Path(tempfile.mkdtemp(prefix="hpcfl-vs-flower-"))
    print(f"federation ({CONFIG}): {spec['clients']} sites x 1 rank, {spec['rounds']} rounds, MLP 64-"
          f"{'-'.join(map(str, spec['hidden']))}-10, {spec['epochs']} local epoch(s) of SGD lr {spec['lr']} "
          f"momentum {spec['momentum']} batch {spec['batch_size']}, FedAvg, federated evaluation every round")
    print(f"Flower: flwr {flwr_version[0]} (ray {flwr_version[1]}, torch {flwr_version[2]}), run_simulation on Ray, "
          f"{spec['clients']} SuperNodes x 1 CPU; {os.cpu_count()} cores on this machine", flush=True)

    hp = run_hpcfl(tmp)
    print(f"  hpcfl  done in {hp['total_s']:.2f} s", flush=True)
    fl = run_flower(tmp, spec)
    print(f"  Flower done in {fl['total_s']:.2f} s", flush=True)

    print("\nper round (ms): round / train / overhead = max(0, round - train)")
    print(f"{'round':>5} {'hpcfl':>24} {'Flower':>26} {'acc hpcfl':>10} {'acc Flower':>11}")
    for a, b in zip(hp["rounds"], fl["rounds"]):
        fa = f"{a['round_s']*1e3:.1f} / {a['train_s']*1e3:.1f} / {overhead(a)*1e3:.1f}"
        fb = f"{b['round_s']*1e3:.1f} / {b['train_s']*1e3:.1f} / {overhead(b)*1e3:.1f}"
        print(f"{a['round']:>5} {fa:>24} {fb:>26} {a['val_accuracy']:>10.4f} {b['val_accuracy']:>11.4f}")

    h, f = stats(hp), stats(fl)
    rows = [("total wall time (s, start-up incl.)", "total_s", "{:.2f}"),
            ("start-up + teardown (s) = total - rounds", "startup_s", "{:.2f}"),
            ("round 1 (ms)", "round1_ms", "{:.1f}"),
            ("median round, rounds 2.. (ms)", "round_med_ms", "{:.1f}"),
            ("mean round, all rounds (ms)", "round_ms", "{:.1f}"),
            ("mean local training, slowest site (ms)", "train_ms", "{:.1f}"),
            ("mean overhead, all rounds (ms)", "over_ms", "{:.1f}"),
            ("median overhead, rounds 2.. (ms)", "over_med_ms", "{:.1f}"),
            ("final val accuracy", "acc", "{:.4f}")]
    print(f"\n{'':<42} {'hpcfl':>10} {'Flower':>10} {'hpcfl/Flower':>13}")
    for label, key, fmt in rows:
        ratio = f"{h[key] / f[key]:.3f}" if key != "acc" and f[key] > 0 else ""
        print(f"{label:<42} {fmt.format(h[key]):>10} {fmt.format(f[key]):>10} {ratio:>13}")
    print(f"\nratio hpcfl/Flower: total time {h['total_s'] / f['total_s']:.3f}, per-round overhead "
          f"{h['over_ms'] / f['over_ms']:.3f} (mean), {h['over_med_ms'] / f['over_med_ms']:.3f} (median of rounds 2..)")
    if args.keep:
        print(f"(runs and logs kept in {tmp})")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
