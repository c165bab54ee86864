"""hpcfl features: one file per slide with provenance, resumable, refusing another model's features;
each site's workers hold only that site's slides."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcfl.checkpoint import write_npz_atomic
from hpcfl.config import dump_yaml, from_dict
from hpcfl.features.extract import assignments, extract, load_run_model
from hpcfl.features.store import FeatureError, load_bag, read_meta
from hpcfl.tasks import DataSpec, make_task
from hpcfl.wsi.index import load_index, slide_partition
from hpcfl.wsi.synth import LabelPlan, synthesize_slides
from hpcfl.wsi.tiling import TilingParams, tile_directory


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat")
    synthesize_slides(d / "slides", 4, 768, 0, labels=LabelPlan(), progress=False)
    tile_directory(d / "slides", d / "index", TilingParams(level=0, tile_size=128, stride=128, backend="openslide"),
                   progress=False)
    return d / "index"


def make_run(root, index_dir, seed=0, sites=({"name": "hospital-a"}, {"name": "hospital-b"})):
    """A run directory as a finished DINO federation leaves it: config.yaml and best.npz."""
    raw = {"task": "dino", "sites": list(sites), "run": {"seed": seed, "root": str(root), "name": "enc"},
           "data": {"name": "tiles", "tiles": {"index_dir": str(index_dir), "backend": "openslide", "input_size": 32}},
           "dino": {"width": 4, "out_dim": 16, "head_hidden": 8, "head_bottleneck": 4,
                    "crops": {"global_size": 16, "local_size": 8, "local_crops": 0}}}
    cfg = from_dict(raw)
    run = root / "enc"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(seed)
    module = make_task(cfg).build_model(DataSpec((3, 32, 32), 4))
    arrays = {f"model/{k}": v.numpy() for k, v in module.state_dict().items() if v.is_floating_point()}
    write_npz_atomic(run / "best.npz", arrays, {"round": 2})
    return run


def test_features_per_slide_with_provenance_then_skipped_then_refused_for_another_model(tmp_path, index_dir):
    run, out = make_run(tmp_path, index_dir), tmp_path / "features"
    man = extract(run, out, checkpoint="best", batch_size=8)
    ix = load_index(index_dir, require_class=False)
    assert man["slides_embedded"] == man["slides"] == len(ix.slide_ids) == 4
    assert man["tiles_embedded"] == len(ix) and man["tiles_per_s"] > 0
    digest = load_run_model(run).digest
    for k, sid in enumerate(ix.slide_ids):
        bag = load_bag(out / f"{sid}.npz")
        sel = ix.slide == k
        assert bag.features.shape == (sel.sum(), 16) and np.isfinite(bag.features).all()  # width 4: 16 channels
        assert np.array_equal(bag.x, ix.x[sel]) and np.array_equal(bag.y, ix.y[sel])
        assert bag.meta["weights_sha256"] == digest and bag.meta["round"] == 2 and bag.meta["encoder"] == "dino"
    # the same model again: every slide skipped, nothing rewritten
    stamp = (out / f"{ix.slide_ids[0]}.npz").stat().st_mtime_ns
    assert extract(run, out, batch_size=8)["slides_embedded"] == 0
    assert (out / f"{ix.slide_ids[0]}.npz").stat().st_mtime_ns == stamp
    # one file lost: only it is made again, identical (deterministic encoder)
    before = load_bag(out / f"{ix.slide_ids[1]}.npz").features
    (out / f"{ix.slide_ids[1]}.npz").unlink()
    assert extract(run, out, batch_size=8)["slides_embedded"] == 1
    assert np.array_equal(load_bag(out / f"{ix.slide_ids[1]}.npz").features, before)
    # another model (another seed): refused in one line naming the file, unless redo
    other = make_run(tmp_path / "other", index_dir, seed=1)
    with pytest.raises(FeatureError, match=r"slide-\d{3}.npz: features of slide slide-\d{3} were made by another model "
                                           r"\(run .*enc, round 2, weights [0-9a-f]{12}.*--redo") as e:
        extract(other, out, batch_size=8)
    assert "\n" not in str(e.value)
    assert extract(other, out, batch_size=8, redo=True)["slides_embedded"] == 4
    assert read_meta(out / "slide-000.npz")["weights_sha256"] == load_run_model(other).digest


def test_each_site_worker_holds_only_its_sites_slides(tmp_path, index_dir):
    run = make_run(tmp_path, index_dir, sites=({"name": "hospital-a", "ranks": 2}, {"name": "hospital-b", "ranks": 1}))
    rm = load_run_model(run)
    ix = load_index(index_dir, require_class=False)
    work = assignments(rm.cfg, ix)
    parts = slide_partition(ix, rm.cfg, 2)
    assert [site for site, _ in work] == ["hospital-a", "hospital-a", "hospital-b"]
    assert sorted(np.concatenate([w[1] for w in work[:2]]).tolist()) == sorted(parts[0].tolist())
    assert sorted(work[2][1].tolist()) == sorted(parts[1].tolist())


def test_a_run_without_a_best_model_is_one_line(tmp_path, index_dir):
    run = make_run(tmp_path, index_dir)
    (run / "best.npz").unlink()
    with pytest.raises(Exception, match=r"best.npz: no best model yet"):
        extract(run, tmp_path / "f")
