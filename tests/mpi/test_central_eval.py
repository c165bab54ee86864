"""eval.central_fraction under a real mpirun: the held-out set's batches are split over every slot rank and
summed exactly, so the round's central_* metrics are bit-identical to one process evaluating the same final
model on the same set, whatever the slots (2 slots of 1 rank; 1 slot of 2 ranks)."""
import json

import numpy as np
import pytest
import torch
from conftest import hpcfl
from hpcfl.central import batches
from hpcfl.checkpoint import load_checkpoint
from hpcfl.config import load_config
from hpcfl.data import held_out, load_dataset, site_partition
from hpcfl.tasks import DataSpec, make_task

pytestmark = pytest.mark.usefixtures("need_mpirun")

SETS = ["fl.rounds=2", "fl.local_steps=3", "train.eval_batch_size=40", "eval.central_fraction=0.25",
        "eval.cross_site=false", "eval.locally_tuned=false", "observe.tensorboard=false"]


class _All:
    """Every held-out batch, in order: the single-process evaluation."""

    def __init__(self, x, y, held, bs, num_classes):
        self.x, self.y, self.held, self.bs, self.num_classes = x, y, held, bs, num_classes

    def val_batches(self, batch_size):
        for idx in batches(self.held, self.bs):
            yield self.x[idx], self.y[idx]


def single_process(cfg, run):
    ds = load_dataset(cfg)
    held = held_out(len(ds.y), cfg.eval.central_fraction, cfg.run.seed)[0]
    task = make_task(cfg)
    module = task.build_model(DataSpec(tuple(ds.input_shape), ds.num_classes))
    weights = load_checkpoint(run / "checkpoints" / f"round-{cfg.fl.rounds:06d}.npz")["model"]
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)
    module.eval()
    data = _All(torch.from_numpy(ds.x), torch.from_numpy(ds.y), held, cfg.train.eval_batch_size, ds.num_classes)
    vec = task.evaluate(module, data, type("Ctx", (), {"device": torch.device("cpu")})())
    return task.summarize(vec), len(held)


@pytest.mark.parametrize("sites", ["sites={count: 4, ranks: 1}", "sites={count: 2, ranks: 2}"])
def test_central_evaluation_is_the_single_process_one(tmp_path, sites):
    slots = "launch.slots=2" if "ranks: 1" in sites else "launch.slots=1"
    r = hpcfl("launch", "configs/digits.yaml", "--no-report", "--set", f"run.root={tmp_path}", "--set", "run.name=c",
              *[a for s in SETS + [sites, slots] for a in ("--set", s)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "c"
    summary = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    cfg = load_config("configs/digits.yaml", SETS + [sites, slots])
    want, n_held = single_process(cfg, run)
    assert summary["central_samples"] == n_held == 449  # 25% of the 1,797 digits; 12 batches of 40
    for k in ("loss", "accuracy", "auc", "balanced_accuracy"):
        assert summary[f"central_{k}"] == want[k], k  # bit-identical, not approximately
    assert f"central_accuracy {want['accuracy']:.4f}" in r.stdout  # the console's final line says it
    part = site_partition(cfg, load_dataset(cfg).y, len(cfg.sites))
    owned = np.concatenate(list(part))
    assert len(owned) == 1797 - n_held and not np.isin(owned, held_out(1797, 0.25, cfg.run.seed)[0]).any()
