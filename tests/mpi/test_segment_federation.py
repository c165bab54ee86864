"""task segment under mpirun: a small 3D federation (site a of 2 ranks, site b of 1) on synthetic NIfTI volumes.

* the federated per-class Dice of the last round equals the Dice of the final global model's predictions
  on the same validation volumes, pooled in this process, from the voxel counts: exactly;
* cross-site Dice is in cross_site.json, the console table and the HTML report (headless Chromium);
* a datalist entry pointing to a missing file ends the launch with one line naming it.
"""
import json

import numpy as np
import pytest

from conftest import hpcfl
from test_report import CELLS_JS, IMAGES_JS, Chromium, check_cells, sets

pytestmark = pytest.mark.usefixtures("need_mpirun")

SETTINGS = ["sites=[{name: a, ranks: 2}, {name: b}]", "task=segment", "data.name=volumes", "fl.rounds=2",
            "fl.local_steps=3", "data.volumes.synthesize={volumes: 8, size: [24, 24, 24], shift: [0.0, 0.3]}",
            "segment.patch_size=[16, 16, 16]", "segment.net_args={channels: [4, 8], strides: [2], num_res_units: 0}",
            "segment.samples_per_volume=2", "segment.sw_overlap=0.25", "segment.intensity_range=[-0.5, 1.5]",
            "train.optimizer=adam", "train.lr=0.01", "train.batch_size=1", "observe.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segment")
    (tmp / "seg.yaml").write_text("sites: [{name: a}]\n")
    r = hpcfl("launch", tmp / "seg.yaml", *sets(f"run.root={tmp}", f"data.volumes.root={tmp}/vol", *SETTINGS),
              timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp / "seg", r.stdout


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def pooled_counts(run_dir):
    """The final global model on every site's validation volumes, in this process: the summed confusion
    matrix over both sites, and each site's."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose

    from hpcfl.checkpoint import load_checkpoint, to_state_dict
    from hpcfl.config import load_config
    from hpcfl.tasks import DataSpec
    from hpcfl.tasks.segment import metrics as SM
    from hpcfl.tasks.segment.data import volume_transforms
    from hpcfl.tasks.segment.task import build_net
    from hpcfl.tasks.segment.volumes import read_site

    torch.set_num_threads(1)  # as each rank of the run (2 cores, 4 ranks)
    cfg = load_config(run_dir / "config.yaml")
    seg = cfg.segment
    net = build_net(seg, DataSpec((1, *seg.patch_size), 3))
    state = to_state_dict(load_checkpoint(run_dir / "checkpoints" / f"round-{cfg.fl.rounds:06d}.npz"))
    net.load_state_dict(state, strict=True)
    net.eval()
    per_site = {}
    for i, s in enumerate(cfg.sites):
        vols = read_site(cfg, s.name, i)
        det = Compose(volume_transforms(seg, vols.classes)[0])
        cm = np.zeros((3, 3), np.int64)
        for item in vols.validation:
            d = det(dict(item))
            x, y = d["image"][None].float(), d["label"][None].long()
            with torch.no_grad():
                logits = sliding_window_inference(x, tuple(seg.patch_size), seg.sw_batch_size, net,
                                                  overlap=seg.sw_overlap)
            cm += SM.confusion(logits.argmax(1).numpy(), y[:, 0].numpy(), 3)
        per_site[s.name] = cm
    return per_site


def test_federated_dice_equals_the_dice_of_pooled_predictions_and_labels(run):
    from hpcfl.tasks.segment import metrics as SM

    run_dir, _ = run
    recs = records(run_dir)
    last = max(r["round"] for r in recs if r["kind"] == "round")
    summary = next(r for r in recs if r["kind"] == "round" and r["round"] == last)
    sites = {r["site"]: r for r in recs if r["kind"] == "site" and r["round"] == last and r["split"] == "val"
             and r["model"] == "global"}
    per_site = pooled_counts(run_dir)
    pooled = sum(per_site.values())
    for name, cm in per_site.items():  # each site's sums (site a: its 2 ranks' shares added) = its volumes' counts
        got = sites[name]
        assert (got["intersection"], got["predicted"], got["labelled"]) == \
            (np.diag(cm).tolist(), cm.sum(0).tolist(), cm.sum(1).tolist()), name
        assert got["dice"] == SM.dice_from_confusion(cm)
        assert got["samples"] == 2
    want = SM.dice_from_confusion(pooled)
    assert summary["val_mean_dice"] == SM.mean_dice(want, include_background=False)  # exact: from the counts
    fed = SM.summarize(np.concatenate([[0.0, 4.0], pooled.ravel()]), False, False)
    assert fed["dice"] == want and 0.0 < summary["val_mean_dice"] <= 1.0


def test_cross_site_dice_in_cross_site_json_console_and_report(run, tmp_path):
    run_dir, stdout = run
    doc = json.loads((run_dir / "cross_site.json").read_text())
    assert doc["headline"] == "mean_dice"
    assert set(doc["models"]) == {"global", "a", "b"}
    for model, per in doc["models"].items():
        assert set(per) == {"a", "b"}
        assert all(0.0 <= per[s]["mean_dice"] <= 1.0 and len(per[s]["dice"]) == 3 for s in per), model
    assert "cross-site validation (mean_dice; rows: model" in stdout
    row = next(line for line in stdout.splitlines() if line.strip().startswith("global "))
    assert row.split()[1:] == [f"{doc['models']['global'][s]['mean_dice']:.4f}" for s in ("a", "b")]

    out = tmp_path / "report.html"
    r = hpcfl("report", run_dir, "-o", out, timeout=300)
    assert r.returncode == 0, r.stderr
    browser = Chromium(tmp_path)
    try:
        page = browser.open(out.resolve().as_uri())
        images = browser.evaluate(page, IMAGES_JS)
        cells = browser.evaluate(page, CELLS_JS)
        errors = browser.errors(page)
    finally:
        browser.close()
    assert errors == []
    alts = {i["alt"]: i for i in images}
    for want in ("seg: cross-site mean_dice", "seg: validation mean dice and loss per site per round"):
        assert want in alts and alts[want]["w"] > 0, sorted(alts)
    cross = [c for c in cells if c["table"] == "cross_site"]
    assert len(cross) == 3 * 2 and {c["metric"] for c in cross} == {"mean_dice"}
    assert check_cells(cells, 0, run_dir) >= 6 + 2 * 2 * 4


def test_a_datalist_entry_pointing_to_a_missing_file_ends_the_launch_in_one_line(tmp_path):
    site = tmp_path / "vol" / "a"
    site.mkdir(parents=True)
    (site / "datalist.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"},
                                                    "training": [{"image": "i.nii.gz", "label": "l.nii.gz"}],
                                                    "validation": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}))
    (tmp_path / "seg.yaml").write_text("sites: [{name: a}]\ntask: segment\ndata: {name: volumes}\n")
    r = hpcfl("launch", tmp_path / "seg.yaml", *sets(f"run.root={tmp_path}", f"data.volumes.root={tmp_path}/vol"),
              timeout=300)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcfl:")]  # rank 0's line, then the launcher's
    want = f"hpcfl: rank 0 failed: {site / 'i.nii.gz'}: not found ({site / 'datalist.json'}: training[0].image)"
    assert 1 <= len(lines) <= 2 and all(x.startswith(want) for x in lines), r.stderr
    assert "Traceback" not in r.stderr
