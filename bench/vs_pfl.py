#!/usr/bin/env python
"""hpcfl next to Apple's pfl-research (PyPI ``pfl`` 0.6.0) and a plain single-process loop, in one run.

pfl is the fastest open simulator we know of: a worker keeps one model, trains its share of the
cohort in place, sums the updates locally and all-reduces one flat vector per round. The plain loop
is the floor: the same local training, one process, no framework (FedAvg written out in 20 lines).

Configurations (every side the same data, partition, cohorts, per-round shuffles, initial weights
and hyperparameters; FedAvg weighted by training samples; local SGD without momentum, fresh each
round; the global model evaluated on the validation data of the sites hpcfl's
``eval.sites_every``/``sites_max`` choose, which every side evaluates alike):

  (a) digits: scikit-learn's 1,797 8x8 digits split IID over K sites (80/20 train/validation per
      site), MLP 64-256-10, 1 local epoch of batch 32, lr 0.1, 10 rounds; every site every round,
      and a cohort of 50 per round where K > 50. K = 2, 8, 32, 128, 512 (K = 1000 cannot be cut
      from 1,797 samples with a training and a validation sample per site).
  (b) pfl's benchmark shape (its CIFAR-10 set-up, on synthetic data: CIFAR-10 cannot be downloaded
      here): class-conditioned 32x32x3 images (a fixed random pattern per class plus noise),
      1,000 sites x 63 samples (50 to train on, 13 to validate on), a cohort of 50 per round, pfl's
      small CNN (benchmarks/model/pytorch/cnn.py: conv 32, conv 64, max-pool, dense 128; without its
      two dropout layers, so all sides follow one trajectory), 1 local epoch of batch 10, lr 0.1,
      evaluation every 10 rounds; 100 rounds unless --rounds.
  (c) (b) with Dirichlet(0.3) label skew (hpcfl's data.partition: dirichlet; it skews quantity too).

Sides, each with the same 2 cores:
  hpcfl    ``hpcfl launch`` on a config written for the case (data.name: arrays, the slots it picks,
           launch.assign: balanced for cohorts; checkpoints every round as always; no report,
           TensorBoard, locally tuned or cross-site evaluation, which the others do not do). Each rank
           in a session of its own (hpcfl launch's default, as torchrun does for pfl-2's workers).
  hpcfl-1  the same with one slot (launch.slots=1): rank 0 and one training process.
  hpcfl-shared, pfl-2-shared: the ranks / workers left in the bench's session. Why it matters: with
           sched_autogroup_enabled (most distributions' default) Linux shares contended cores between
           sessions, not processes, so on a machine other sessions load, N processes of one session
           together get about one process's share (docs/benchmarks.md section 12.6).
  plain    one process, torch on 1 thread (--threads): for each round, for each cohort site, load the global
           weights, train, add n_s * (w_s - w); then w += sum / sum(n_s).
  pfl-1    pfl's SimulatedBackend + FederatedAveraging + PyTorchModel, one process, 1 thread (--threads).
  pfl-2    the same under ``torchrun --nproc_per_node 2`` (1 thread each), with pfl's own
           work-sorted cohort split (user_id_to_weight = training samples).
pfl runs under .bench-pfl-venv (bench/requirements-pfl.txt), apart from the project's .venv.
The main process computes the cohorts, shuffles and evaluation sets with hpcfl's own functions
and hands them to the other sides in a plan file, so none of them re-implements hpcfl's seeding.

Columns: wall (the whole command, start-up included), steady round (median of rounds 2..), overhead
(median over rounds 2.. of max(0, round - training of the slowest slot or worker)), peak PSS of the
process tree (sampled every 50 ms; shared pages counted once), final accuracy, and hpcfl/plain,
pfl/plain; the CPU seconds (user + system) of each side's process tree, in all and per steady round, the
sessions its busy processes ran in, and each process's cores in the steady rounds (sampled from /proc every
50 ms); the load average when each side started. --repeat N runs the sides interleaved N times and adds
medians. The script asserts that every side's accuracy agrees with the plain loop's at every
evaluated round (within --tol: float rounding differs between the sides and grows over rounds).

    .venv/bin/python bench/vs_pfl.py --install    # creates .bench-pfl-venv first
    .venv/bin/python bench/vs_pfl.py              # (a), (b), (c); (b) and (c) take long on 2 cores
    .venv/bin/python bench/vs_pfl.py --quick      # smoke test: K = 2, 32; (b), (c) at 200 sites, 3 rounds
    .venv/bin/python bench/vs_pfl.py --cases b --rounds 5 --eval-every 5 --repeat 3 --sides hpcfl pfl-2 plain hpcfl-1 pfl-1

The machine is shared: compare within one run (ratios), not across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-pfl-venv"
REQS = ROOT / "bench" / "requirements-pfl.txt"
THREADS = [1]  # torch threads of the single-process sides (--threads)
INSTALL_CMD = "python3 -m venv .bench-pfl-venv && .bench-pfl-venv/bin/pip install -r bench/requirements-pfl.txt"


# ---------------------------------------------------------------------------------------------------
# Models: hpcfl builds them through model.name "vs_pfl:<factory>"; the other sides call the same code
# ---------------------------------------------------------------------------------------------------

def mlp(num_features: int, num_classes: int, hidden: int = 256):
    import torch.nn as nn

    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def simple_cnn(num_features: int, num_classes: int, side: int = 32, channels: int = 3):
    """pfl-research's benchmarks/model/pytorch/cnn.py simple_cnn (channels-first input, no dropout),
    with its Glorot-uniform weights."""
    import torch
    import torch.nn as nn

    flat = ((side - 4) // 2) ** 2 * 64
    model = nn.Sequential(nn.Conv2d(channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            torch.nn.init.xavier_uniform_(m.weight)
    return model


# ---------------------------------------------------------------------------------------------------
# Cases and the plan (project venv)
# ---------------------------------------------------------------------------------------------------

def cases(args) -> List[Dict[str, Any]]:
    out = []
    if "a" in args.cases:
        for k in args.ks:
            for cohort in ([None] + ([50] if k > 50 else [])):
                out.append({"name": f"a-digits-K{k}" + (f"-c{cohort}" if cohort else "-all"), "data": "digits",
                            "k": k, "cohort": cohort, "rounds": args.digit_rounds, "batch": 32, "model": "mlp",
                            "every": 1, "partition": "iid"})
    for case, part in (("b", "iid"), ("c", "dirichlet")):
        if case in args.cases:
            out.append({"name": f"{case}-images-{args.sites}x50-{part}", "data": "images", "k": args.sites,
                        "cohort": 50, "rounds": args.rounds, "batch": 10, "model": "simple_cnn",
                        "every": args.eval_every, "partition": part})
    return out


def write_data(case: Dict[str, Any], d: Path) -> Path:
    """x.npy / y.npy for data.name: arrays (every side reads the same memory-mapped files)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    out = d / f"data-{case['data']}-{case['k']}"
    if (out / "y.npy").exists():
        return out
    out.mkdir(parents=True)
    if case["data"] == "digits":
        from hpcfl.config import from_dict
        from hpcfl.data import load_dataset

        ds = load_dataset(from_dict({"sites": {"count": 2, "ranks": 1}}, "digits"))
        np.save(out / "x.npy", ds.x)
        np.save(out / "y.npy", ds.y)
        return out
    n, c = case["k"] * 63, 10
    rng = np.random.default_rng(1234)
    patterns = rng.normal(0.0, 1.0, (c, 3, 8, 8)).astype(np.float32).repeat(4, axis=2).repeat(4, axis=3)
    y = rng.integers(0, c, n).astype(np.int64)
    x = np.lib.format.open_memmap(out / "x.npy", mode="w+", dtype=np.float32, shape=(n, 3, 32, 32))
    for s in range(0, n, 4096):  # in chunks: 63,000 images are 770 MB
        e = min(n, s + 4096)
        x[s:e] = 0.5 * patterns[y[s:e]] + rng.normal(0.0, 1.0, (e - s, 3, 32, 32)).astype(np.float32)
    x.flush()
    del x
    np.save(out / "y.npy", y)
    return out


def hpcfl_config(case: Dict[str, Any], data_dir: Path, d: Path) -> Path:
    """The case as an hpcfl config file (what the hpcfl side runs and what the plan is computed from)."""
    lines = ["run: {seed: 0}",
             f"fl: {{rounds: {case['rounds']}, local_epochs: 1"
             + (f", sampling: {{fraction: {case['cohort'] / case['k']!r}}}" if case["cohort"] else "") + "}",
             f"sites: {{count: {case['k']}, ranks: 1}}",
             f"data: {{name: arrays, path: {data_dir}, partition: {case['partition']}, dirichlet_alpha: 0.3, "
             "val_fraction: 0.2}",
             f"model: {{name: 'vs_pfl:{case['model']}'}}",
             f"train: {{optimizer: sgd, lr: 0.1, momentum: 0.0, batch_size: {case['batch']}, eval_batch_size: 1024}}",
             f"eval: {{sites_every: {case['every']}, sites_max: 128, locally_tuned: false, cross_site: false}}",
             "observe: {tensorboard: false}",
             "launch: {assign: " + ("balanced" if case["cohort"] else "static") + "}"]
    path = d / f"{case['name']}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_plan(case: Dict[str, Any], config: Path, data_dir: Path, d: Path) -> Path:
    """Cohorts, shuffles, evaluation sets and initial weights, from hpcfl's own seeded functions."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from hpcfl.config import load_config
    from hpcfl.data import epoch_shard, load_dataset, partition, train_val_split
    from hpcfl.participation import RETURNS, eval_sites, plan_round
    from hpcfl.tasks import DataSpec, make_task

    cfg = load_config(config)
    ds = load_dataset(cfg)
    k, seed = len(cfg.sites), cfg.run.seed
    parts = partition(ds.y, k, cfg.data.partition, seed, cfg.data.dirichlet_alpha)
    rng = np.random.default_rng([seed, 29])  # rank 0's plan generator (protocol/server.py)
    splits: Dict[int, Any] = {}

    def split(s: int):
        if s not in splits:
            splits[s] = train_val_split(parts[s], cfg.data.val_fraction, seed, s)
        return splits[s]

    rounds = []
    for r in range(1, cfg.fl.rounds + 1):
        plan = plan_round(rng, cfg.fl, cfg.sites, np.ones(k, np.int64), r)
        cohort = [int(s) for s in np.flatnonzero(plan.codes == RETURNS)]
        orders = [epoch_shard(split(s)[0], 0, 1, seed, r, 0, s) for s in cohort]
        ev = eval_sites(cfg.eval, seed, k, r, cfg.fl.rounds)
        val = np.concatenate([split(int(s))[1] for s in ev]) if len(ev) else None
        rounds.append({"cohort": cohort, "orders": orders, "val": val})
    torch.manual_seed(seed)  # hpcfl's SiteTrainer: the same generator state, the same build call
    module = make_task(cfg).build_model(DataSpec(tuple(ds.input_shape), int(ds.num_classes)))
    init = [p.detach().numpy().copy() for p in module.state_dict().values()]
    out = d / f"{case['name']}.plan.pkl"
    with open(out, "wb") as f:
        pickle.dump({"case": case, "data": str(data_dir), "rounds": rounds, "init": init,
                     "num_features": int(np.prod(ds.input_shape)), "num_classes": int(ds.num_classes),
                     "lr": cfg.train.lr, "batch": cfg.train.batch_size}, f)
    return out


# ---------------------------------------------------------------------------------------------------
# Measuring a command (project venv)
# ---------------------------------------------------------------------------------------------------

def _measured(argv: List[str], cwd: Path, env: Dict[str, str], log: Path):
    """(exit code, wall s, peak PSS, every process of the tree: label, session, CPU seconds)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scale_sites import measured

    procs: List[Dict[str, Any]] = []
    rc, wall, pss = measured(argv, cwd, env=env, log=log, procs=procs)
    return rc, wall, pss, [p for p in procs if p["cpu_s"] > 0.0]


SHARED = "-shared"  # a side's name + SHARED: every process of that side in the bench's one session
# hpcfl-1: one slot (rank 0 and one training process: the single-process sides' counterpart)


def run_hpcfl(case, config: Path, d: Path, side: str = "hpcfl", tag: str = "hpcfl") -> Dict[str, Any]:
    name = f"{case['name']}-{tag}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"),  # hpcfl launch: each rank its own session, unless
               HPCFL_RANK_SESSION="keep" if side.endswith(SHARED) else "own")  # -shared (hpcfl.comm.own_session)
    argv = [sys.executable, "-m", "hpcfl", "launch", str(config), "--no-report", "--set", f"run.root={d}",
            "--set", f"run.name={name}"] + (["--set", "launch.slots=1"] if side == "hpcfl-1" else [])
    rc, wall, pss, procs = _measured(argv, ROOT, env, d / f"{name}.log")
    if rc != 0:
        sys.exit(f"hpcfl {case['name']} failed ({rc}); see {d / name}.log:\n{(d / f'{name}.log').read_text()[-3000:]}")
    recs = [json.loads(x) for x in (d / name / "metrics.jsonl").read_text().splitlines()]
    rounds = [{"round": x["round"], "round_s": x["time"]["round_s"], "train_s": x["time"]["train_s"],
               "val_accuracy": x["val_accuracy"], "straggler_s": x["time"].get("straggler_s", 0.0),
               "t": x["timestamp"]}
              for x in recs if x["kind"] == "round"]
    slots = len(json.loads((d / name / "manifest.json").read_text())["slots"])
    return {"wall_s": wall, "pss": pss, "rounds": rounds, "note": f"{slots} slot(s)", "procs": procs}


def run_worker(side: str, plan: Path, d: Path, tag: str = "") -> Dict[str, Any]:
    tag = tag or side
    out = d / f"{plan.stem}-{tag}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"), VS_PFL_THREADS=str(THREADS[0]),
               OMP_NUM_THREADS=str(THREADS[0]) if not side.startswith("pfl-2") else "1")
    script = str(ROOT / "bench" / "vs_pfl.py")
    if side == "plain":
        argv = [sys.executable, script, "--plain-worker", str(plan), str(out)]
    elif side == "pfl-1":
        argv = [str(VENV / "bin" / "python"), script, "--pfl-worker", str(plan), str(out)]
    else:  # torchrun starts each worker in a session of its own; pfl-2-shared keeps them in this one
        run = [str(VENV / "bin" / "torchrun")] if side == "pfl-2" else [str(VENV / "bin" / "python"), script, TORCHRUN_SHARED]
        argv = run + ["--standalone", "--nproc_per_node", "2", script, "--pfl-worker", str(plan), str(out)]
    rc, wall, pss, procs = _measured(argv, d, env, d / f"{plan.stem}-{tag}.log")
    if rc != 0 or not out.exists():
        sys.exit(f"{side} {plan.stem} failed ({rc}); see {d / plan.stem}-{tag}.log")
    return {"wall_s": wall, "pss": pss, "rounds": json.loads(out.read_text()), "note": "", "procs": procs}


# ---------------------------------------------------------------------------------------------------
# The plain loop and the pfl side (each in its own process)
# ---------------------------------------------------------------------------------------------------

TORCHRUN_SHARED = "--torchrun-shared-session"


def torchrun_shared_session(argv: List[str]) -> None:
    """torchrun, its workers left in the caller's session (torch's elastic agent starts each in its own)."""
    import subprocess as sp

    import torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler as sh
    from torch.distributed.run import main as torchrun

    class Popen(sp.Popen):
        def __init__(self, *a, **kw):
            kw["start_new_session"] = False
            super().__init__(*a, **kw)

    sh.Popen = Popen
    torchrun(argv)


def _load(plan_path: str):
    import numpy as np
    import torch

    with open(plan_path, "rb") as f:
        plan = pickle.load(f)
    x = torch.from_numpy(np.load(Path(plan["data"]) / "x.npy", mmap_mode="c"))
    y = torch.from_numpy(np.load(Path(plan["data"]) / "y.npy").astype(np.int64))
    case = plan["case"]
    factory = mlp if case["model"] == "mlp" else simple_cnn
    torch.manual_seed(0)
    model = factory(plan["num_features"], plan["num_classes"])
    with torch.no_grad():
        for p, v in zip(model.state_dict().values(), plan["init"]):
            p.copy_(torch.from_numpy(v))
    return plan, x, y, model


def _accuracy(model, x, y, idx) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for b in range(0, len(idx), 1024):
            i = torch.from_numpy(idx[b:b + 1024])
            correct += int((model(x[i]).argmax(1) == y[i]).sum())
    model.train()
    return correct / len(idx)


def plain_worker(plan_path: str, out: str) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(int(os.environ.get("VS_PFL_THREADS", "1")))
    plan, x, y, model = _load(plan_path)
    params = list(model.parameters())
    rows = []
    for r, rnd in enumerate(plan["rounds"], 1):
        t0 = time.perf_counter()
        glob = [p.detach().clone() for p in params]
        acc = [torch.zeros_like(p) for p in params]
        total, train_s = 0.0, 0.0
        for order in rnd["orders"]:
            t = time.perf_counter()
            with torch.no_grad():
                for p, g in zip(params, glob):
                    p.copy_(g)
            opt = torch.optim.SGD(params, lr=plan["lr"])
            idx = torch.from_numpy(order)
            for b in range(0, len(idx), plan["batch"]):
                i = idx[b:b + plan["batch"]]
                opt.zero_grad()
                F.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
            train_s += time.perf_counter() - t
            with torch.no_grad():
                for a, p, g in zip(acc, params, glob):
                    a.add_((p - g) * float(len(order)))
            total += len(order)
        with torch.no_grad():
            for p, g, a in zip(params, glob, acc):
                p.copy_(g + a / total)
        val = _accuracy(model, x, y, rnd["val"]) if rnd["val"] is not None else None
        rows.append({"round": r, "round_s": time.perf_counter() - t0, "train_s": train_s, "val_accuracy": val,
                     "t": time.time()})
    Path(out).write_text(json.dumps(rows))


def pfl_worker(plan_path: str, out: str) -> None:
    """pfl 0.6.0: SimulatedBackend, FederatedAveraging, PyTorchModel, WeightByDatapoints; a user is one
    (round, site): its data in that round's shuffle, so pfl trains exactly what the others train."""
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    workers = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("VS_PFL_THREADS", "1")) if workers == 1 else 1)
    plan, x, y, model = _load(plan_path)

    def loss(self, xb, yb, eval=False):  # noqa: A002 - pfl's signature
        self.eval() if eval else self.train()
        return F.cross_entropy(self(xb), yb)

    def metrics(self, xb, yb, eval=True):  # noqa: A002
        return {}

    import types

    model.loss, model.metrics = types.MethodType(loss, model), types.MethodType(metrics, model)
    users = [(r, s) for r, rnd in enumerate(plan["rounds"]) for s in range(len(rnd["cohort"]))]
    order = {(r, j): rnd["orders"][j] for r, rnd in enumerate(plan["rounds"]) for j in range(len(rnd["cohort"]))}
    stream = iter(users)

    def sampler():
        return next(stream, users[0])  # pfl's samplers read ahead: past the plan, anything

    def make_dataset(uid):
        i = torch.from_numpy(order[uid])
        return Dataset(raw_data=[x[i], y[i]], user_id=uid)

    weights = {u: len(order[u]) for u in users} if workers > 1 else None
    fed = FederatedDataset(make_dataset, sampler, user_id_to_weight=weights)
    train_s = [0.0]

    class Timed(FederatedAveraging):
        def train_one_user(self, *a, **kw):
            t = time.perf_counter()
            res = super().train_one_user(*a, **kw)
            train_s[0] += time.perf_counter() - t
            return res

    rows: List[Dict[str, Any]] = []
    t_prev = [time.perf_counter()]

    class Rounds(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model_, *, central_iteration):
            rnd = plan["rounds"][central_iteration]
            val = _accuracy(model, x, y, rnd["val"]) if rnd["val"] is not None else None
            now = time.perf_counter()
            rows.append({"round": central_iteration + 1, "round_s": now - t_prev[0], "train_s": train_s[0],
                         "val_accuracy": val, "t": time.time()})
            t_prev[0], train_s[0] = now, 0.0
            return False, Metrics()

    pmodel = PyTorchModel(model=model, local_optimizer_create=torch.optim.SGD,
                          central_optimizer=torch.optim.SGD(model.parameters(), 1.0))
    backend = SimulatedBackend(training_data=fed, val_data=None, postprocessors=[WeightByDatapoints()])
    Timed().run(algorithm_params=NNAlgorithmParams(central_num_iterations=len(plan["rounds"]),
                                                   evaluation_frequency=10**9,
                                                   train_cohort_size=len(plan["rounds"][0]["cohort"]),
                                                   val_cohort_size=None),
                backend=backend, model=pmodel,
                model_train_params=NNTrainHyperParams(local_learning_rate=plan["lr"], local_num_epochs=1,
                                                      local_batch_size=plan["batch"]),
                model_eval_params=NNEvalHyperParams(local_batch_size=1024), callbacks=[Rounds()])
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(rows))


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def summary(res: Dict[str, Any]) -> Dict[str, Any]:
    rounds = res["rounds"]
    steady = rounds[1:] or rounds
    accs = [r["val_accuracy"] for r in rounds if r["val_accuracy"] is not None]
    return {"wall_s": res["wall_s"], "round_ms": 1e3 * statistics.median(r["round_s"] for r in steady),
            "overhead_ms": 1e3 * statistics.median(max(0.0, r["round_s"] - r["train_s"]) for r in steady),
            "pss_mb": res["pss"] / 2**20, "acc": accs[-1] if accs else float("nan"), "note": res["note"],
            "cpu_s": sum(p["cpu_s"] for p in res["procs"]), "sessions": sessions(res["procs"]),
            "procs": res["procs"], "window": steady_window(rounds), "round_cpu_s": round_cpu(res)}


def round_cpu(res: Dict[str, Any]) -> float:
    """CPU seconds (user + system, every process of the side) per steady round: the side's work, which the
    machine's load stretches far less than its wall time."""
    from scale_sites import cores_between

    t0, t1 = steady_window(res["rounds"])
    n = sum(1 for r in res["rounds"] if t0 < r["t"] <= t1)
    return sum(cores_between(p["series"], t0, t1) for p in res["procs"]) * (t1 - t0) / max(n, 1)


def sessions(procs: List[Dict[str, Any]]) -> int:
    """Sessions among a side's processes that used 2% or more of its CPU time: Linux's autogroup scheduler
    (sched_autogroup_enabled) shares the cores between sessions, not processes, when they are contended."""
    total = sum(p["cpu_s"] for p in procs) or 1.0
    return len({p["sid"] for p in procs if p["cpu_s"] >= 0.02 * total})


def steady_window(rounds: List[Dict[str, Any]]) -> tuple:
    """Wall-clock times between which the steady rounds ran: the end of round 1 to the end of the last round
    that did not evaluate (so training and the protocol, not evaluation), else of the last round."""
    ends = [r["t"] for r in rounds]
    quiet = [r["t"] for r in rounds[1:] if r["val_accuracy"] is None]
    return ends[0], (quiet[-1] if quiet else ends[-1])


def busy(row: Dict[str, Any]) -> str:
    """A side's processes that used 2% or more of its CPU time: label, cores used in the steady rounds (CPU s per
    s), CPU seconds / seconds alive over the whole run, session."""
    from scale_sites import cores_between

    total = row["cpu_s"] or 1.0
    t0, t1 = row["window"]
    procs = sorted((p for p in row["procs"] if p["cpu_s"] >= 0.02 * total), key=lambda p: p["label"])
    return f"  {row['side']:<13} {row['note'].split()[0]:<3} " + ", ".join(
        f"{p['label']} {cores_between(p['series'], t0, t1):.2f} cores ({p['cpu_s']:.1f}/{p['alive_s']:.1f} s, "
        f"sid {p['sid']})" for p in procs)


def check_agreement(case_name: str, results: Dict[str, Any], tol: float) -> None:
    """Every side's accuracy at every evaluated round within ``tol`` of the plain loop's."""
    ref = {r["round"]: r["val_accuracy"] for r in results["plain"]["rounds"] if r["val_accuracy"] is not None}
    for side, res in results.items():
        got = {r["round"]: r["val_accuracy"] for r in res["rounds"] if r["val_accuracy"] is not None}
        if got.keys() != ref.keys():
            sys.exit(f"{case_name}: {side} evaluated rounds {sorted(got)}, plain {sorted(ref)}")
        worst = max(abs(got[r] - ref[r]) for r in ref)
        if worst > tol:
            sys.exit(f"{case_name}: {side}'s accuracy differs from the plain loop's by {worst:.4f} > {tol} "
                     f"(round by round: {[(r, round(got[r], 4), round(ref[r], 4)) for r in sorted(ref)]})")


def table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'case':<28} {'side':<13} {'wall s':>8} {'round ms':>9} {'ovh ms':>8} {'PSS MiB':>8} {'acc':>7} "
            f"{'/plain wall':>11} {'/plain round':>12} {'CPU s':>7} {'CPU/rnd':>7} {'/plain':>6} {'sess':>4} {'load':>5}  note")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['case']:<28} {r['side']:<13} {r['wall_s']:>8.2f} {r['round_ms']:>9.1f} {r['overhead_ms']:>8.1f} "
                   f"{r['pss_mb']:>8.0f} {r['acc']:>7.4f} {r['x_wall']:>11.2f} {r['x_round']:>12.2f} "
                   f"{r['cpu_s']:>7.1f} {r['round_cpu_s']:>7.2f} {r['x_cpu']:>6.2f} {r['sessions']:>4} {r['load']:>5.1f}  "
                   f"{r['note']}")
    out.append("CPU s: user + system seconds of the side's process tree; CPU/rnd: of those, per steady round (end of "
               "round 1 to the end of the last round without evaluation), and /plain its ratio to the plain loop's; "
               "sess: the sessions its busy processes ran in. "
               "Per process: cores used from the end of round 1 to the end of the last round without evaluation "
               "(CPU s / s), then CPU s / s alive over the whole run; load: the 1-minute load average when the side "
               "started:")
    out += [busy(r) for r in rows if r["procs"]]
    return "\n".join(out)


def repetition(case, config: Path, plan: Path, d: Path, args, rep: int) -> List[Dict[str, Any]]:
    """Every side once, in --sides order; rows with ratios to this repetition's plain loop."""
    results, loads = {}, {}
    for side in args.sides:
        print(f"{case['name']}: {side} (repetition {rep}) ...", file=sys.stderr, flush=True)
        loads[side] = os.getloadavg()[0]
        tag = f"{side}-r{rep}"
        results[side] = run_hpcfl(case, config, d, side, tag) if side.startswith("hpcfl") else \
            run_worker(side, plan, d, tag)
    if "plain" in results:
        check_agreement(case["name"], results, args.tol)
    base = summary(results["plain"]) if "plain" in results else None
    rows = []
    for side, res in results.items():
        s = summary(res)
        s.update(case=case["name"], side=side, load=loads[side], note=f"#{rep} {s['note']}".strip(),
                 x_wall=s["wall_s"] / base["wall_s"] if base else float("nan"),
                 x_round=s["round_ms"] / base["round_ms"] if base else float("nan"),
                 x_cpu=s["round_cpu_s"] / base["round_cpu_s"] if base and base["round_cpu_s"] else float("nan"))
        rows.append(s)
    return rows


def medians(rows: List[Dict[str, Any]], sides: List[str], n: int) -> List[Dict[str, Any]]:
    """Per side, the median of every number over the repetitions (ratios: of the per-repetition ratios)."""
    out = []
    for side in sides:
        mine = [r for r in rows if r["side"] == side]
        m = {k: statistics.median(r[k] for r in mine) for k in ("wall_s", "round_ms", "overhead_ms", "pss_mb", "acc",
                                                              "x_wall", "x_round", "cpu_s", "sessions", "load",
                                                              "round_cpu_s", "x_cpu")}
        m.update(case=mine[0]["case"], side=side, note=f"median of {n}", procs=[], window=(0.0, 0.0))
        out.append(m)
    return out


def autogroup() -> str:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        return "absent"


def install() -> None:
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(REQS)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--install", action="store_true", help=f"create {VENV.name} from {REQS.name} if it lacks pfl")
    ap.add_argument("--quick", action="store_true", help="smoke test: K = 2, 32; 200 sites, 3 rounds for (b), (c)")
    ap.add_argument("--cases", default="abc", help="which of a, b, c (default all)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32, 128, 512], help="(a): numbers of sites")
    ap.add_argument("--digit-rounds", type=int, default=10)
    ap.add_argument("--sites", type=int, default=1000, help="(b), (c): number of sites")
    ap.add_argument("--rounds", type=int, default=100, help="(b), (c): rounds")
    ap.add_argument("--eval-every", type=int, default=10, help="(b), (c): evaluate every N rounds")
    ap.add_argument("--sides", nargs="+", default=["hpcfl", "plain", "pfl-1", "pfl-2"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the single-process sides (plain, "
                    "pfl-1); 1: hpcfl's ranks and pfl-2's workers run 1 each, and on this loaded 2-core machine "
                    "a second intra-op thread spun more than it helped these small models")
    ap.add_argument("--repeat", type=int, default=1, help="run the sides this many times, interleaved (A B C A B "
                    "C ...), and add each side's medians: on a shared machine the load moves between runs")
    ap.add_argument("--tol", type=float, default=0.02, help="largest accuracy difference to the plain loop")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--workdir", type=Path, help="keep data, configs, runs and logs here (default: a temporary directory)")
    ap.add_argument("--plain-worker", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--pfl-worker", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    if sys.argv[1:2] == [TORCHRUN_SHARED]:
        return torchrun_shared_session(sys.argv[2:])
    args = ap.parse_args()
    if args.plain_worker:
        return plain_worker(*args.plain_worker)
    if args.pfl_worker:
        return pfl_worker(*args.pfl_worker)
    THREADS[0] = args.threads
    if args.quick:
        args.ks, args.digit_rounds, args.sites, args.rounds, args.eval_every = [2, 32], 3, 200, 3, 1
    if any(s.startswith("pfl") for s in args.sides):
        ok = (VENV / "bin" / "python").exists() and subprocess.run(
            [str(VENV / "bin" / "python"), "-c", "import pfl"], capture_output=True).returncode == 0
        if not ok and not args.install:
            sys.exit(f"{VENV} has no pfl: run `{INSTALL_CMD}`, or this script with --install")
        if not ok:
            install()
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vs-pfl-") as tmp:
        d = Path(tmp) if args.workdir is None else args.workdir
        d.mkdir(parents=True, exist_ok=True)
        for case in cases(args):
            data = write_data(case, d)
            config = hpcfl_config(case, data, d)
            plan = make_plan(case, config, data, d)
            for rep in range(1, args.repeat + 1):
                rows += repetition(case, config, plan, d, args, rep)
            if args.repeat > 1:
                rows += medians([r for r in rows if r["case"] == case["name"]], args.sides, args.repeat)
            print(table([r for r in rows if r["case"] == case["name"]]), file=sys.stderr, flush=True)
            print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr, flush=True)
    print(f"\nhpcfl vs pfl-research {'(quick) ' if args.quick else ''}on {os.cpu_count()} cores "
          f"(sched_autogroup_enabled: {autogroup()}); ratios to the plain single-process loop:")
    print(table(rows))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        for r in rows:
            for p in r["procs"]:
                p.pop("series", None)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
