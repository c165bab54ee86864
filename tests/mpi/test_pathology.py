"""configs/pathology.yaml end to end from the CLI, small: slides with labels from 2 hospitals -> a DINO
encoder federated -> `hpcfl features` on the sites' ranks -> federated attention MIL with DP-FedAvg and
secure aggregation; the pooled slide AUC rank 0 records equals scikit-learn's on the sites' own scores,
and the report shows the attention heatmaps (headless Chromium) with epsilon next to the AUC."""
import json

import numpy as np
import pytest
from conftest import hpcfl

pytestmark = pytest.mark.usefixtures("need_mpirun")


def sets(*pairs):
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pathology")
    pre = [f"run.root={tmp}", f"data.tiles.slides_dir={tmp}/slides", f"data.tiles.index_dir={tmp}/index",
           f"data.tiles.labels={tmp}/slides/labels.csv", "fl.rounds=1", "fl.local_steps=2", "train.batch_size=16",
           "data.tiles.synthesize={slides: 12, size: 1024, seed: 0, hospitals: 2, prevalence: [0.5, 0.5], pattern: atypia}",
           "dino.width=8", "data.val_fraction=0.34"]
    r = hpcfl("launch", "configs/pathology.yaml",
              *sets(f"run.root={tmp}", "pipeline.pretrain_set=" + json.dumps(pre), f"data.bags.dir={tmp}/features",
                    f"data.bags.labels={tmp}/slides/labels.csv", "data.val_fraction=0.34", "fl.rounds=2",
                    "fl.local_epochs=1", "privacy.dp={noise_multiplier: 0.3, clip_norm: 1.0}",
                    "privacy.secure_aggregation={frac_bits: 24}"), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return tmp, r


def test_pipeline_stages_run_in_order_and_resume_skips_them(pipeline):
    tmp, r = pipeline
    out = r.stdout
    assert out.index("pipeline: pretrain") < out.index("pipeline: features") < out.index("pipeline: mil")
    man = json.loads((tmp / "features" / "features.json").read_text())
    assert man["slides"] == man["slides_embedded"] == 12 and man["ranks"] == 2 and man["tiles_per_s"] > 0
    assert {s for p in man["per_rank"] for s in p["sites"]} == {"hospital-a", "hospital-b"}
    again = hpcfl("launch", "configs/pathology.yaml", "--no-report",
                  *sets(f"run.root={tmp}", "pipeline.pretrain_set=" + json.dumps(
                      [f"run.root={tmp}", f"data.tiles.slides_dir={tmp}/slides", f"data.tiles.index_dir={tmp}/index",
                       f"data.tiles.labels={tmp}/slides/labels.csv", "fl.rounds=1", "fl.local_steps=2",
                       "train.batch_size=16", "dino.width=8", "data.val_fraction=0.34",
                       "data.tiles.synthesize={slides: 12, size: 1024, seed: 0, hospitals: 2, prevalence: [0.5, 0.5], pattern: atypia}"]),
                        f"data.bags.dir={tmp}/features", f"data.bags.labels={tmp}/slides/labels.csv",
                        "data.val_fraction=0.34", "fl.rounds=2", "fl.local_epochs=1",
                        "privacy.dp={noise_multiplier: 0.3, clip_norm: 1.0}", "privacy.secure_aggregation={frac_bits: 24}"),
                  timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pretrain: " in again.stdout and "finished round 1; skipped" in again.stdout
    assert "0 of 12 slides embedded" in again.stdout and "mil: " in again.stdout and "finished round 2; skipped" in again.stdout


def test_pooled_auc_equals_sklearn_on_the_sites_scores_and_dp_epsilon_is_recorded(pipeline):
    from sklearn.metrics import roc_auc_score

    from hpcfl.checkpoint import read_npz

    tmp, _ = pipeline
    run = tmp / "pathology"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in recs if x["kind"] == "round"][-1]
    assert last["round"] == 2 and last["dp_epsilon"] > 0
    maps = [read_npz(f) for f in sorted((run / "attention").glob("*.npz"))]
    assert len(maps) >= 4  # every validation slide of both sites
    y = [m["classes"].index(m["label"]) for m, _ in maps]
    p = [m["probabilities"][1] for m, _ in maps]
    assert set(y) == {0, 1}
    assert last["val_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    for m, a in maps:  # attention over the slide's tiles: a distribution
        assert a["attention"].shape == a["x"].shape and abs(float(a["attention"].sum()) - 1) < 1e-5
    sites = {x["site"]: x for x in recs if x["kind"] == "site" and x["round"] == 2 and x["split"] == "val"
             and x["model"] == "global"}
    for name, rec in sites.items():
        mine = [(yy, pp) for (m, _), yy, pp in zip(maps, y, p) if m["site"] == name]
        if len({yy for yy, _ in mine}) == 2:
            assert rec["auc"] == pytest.approx(roc_auc_score(*zip(*mine)), abs=1e-9)


def test_report_draws_attention_heatmaps_in_chromium(pipeline, tmp_path):
    from test_report import IMAGES_JS, Chromium

    tmp, _ = pipeline
    run = tmp / "pathology"
    html = (run / "report.html").read_text()
    assert "Attention heatmaps" in html and 'data-metric="dp_epsilon"' in html and 'data-metric="val_auc"' in html
    browser = Chromium(tmp_path)
    try:
        page = browser.open((run / "report.html").resolve().as_uri())
        images = browser.evaluate(page, IMAGES_JS)
        errors = browser.errors(page)
    finally:
        browser.close()
    assert errors == []
    heat = [i for i in images if i["alt"].startswith("attention of slide-")]
    assert len(heat) == len(list((run / "attention").glob("*.npz"))) >= 4
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in heat)
