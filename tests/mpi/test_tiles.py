"""The tile quickstart under a real mpirun: synthesize, tile, 2 sites x 2 ranks, 2 rounds."""
import json

import pytest

from conftest import hpcfl

pytestmark = pytest.mark.usefixtures("need_mpirun")


def test_tile_quickstart_two_rounds(tmp_path):
    sets = [f"run.root={tmp_path}", f"data.tiles.slides_dir={tmp_path}/slides", f"data.tiles.index_dir={tmp_path}/index",
            "data.tiles.synthesize={slides: 4, size: 2048, seed: 0}", "fl.rounds=2", "data.val_fraction=0.5"]
    r = hpcfl("launch", "configs/quickstart.yaml", *[a for s in sets for a in ("--set", s)], timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "quickstart"
    assert sorted(p.name for p in (tmp_path / "slides").glob("*.tiff")) == [f"slide-00{i}.tiff" for i in range(4)]
    assert len(list((tmp_path / "index").glob("*.feather"))) == 4
    assert len(list((tmp_path / "index").glob("*.thumbnail.png"))) == 4
    manifest = json.loads((run / "manifest.json").read_text())
    part = manifest["partition"]
    assert part["dataset"] == "tiles" and part["partition"] == "slide"
    slides = [set(s["train_slides"]) | set(s["val_slides"]) for s in part["sites"].values()]
    assert not slides[0] & slides[1] and len(slides[0] | slides[1]) == 4  # sites own whole slides
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in recs if x["kind"] == "round"]
    assert [x["round"] for x in rounds] == [1, 2]
    assert all(x["samples"] > 0 for x in recs if x["kind"] == "site")
    assert rounds[-1]["time"]["data_s"] > 0
    assert (run / ".cucim-shared_memory-256.json").exists()  # the configured tile cache, used by every site rank


@pytest.mark.parametrize("options", [
    ["data.tiles.smart_cache={cache_num: 64, replace_rate: 0.5}"],
    ["data.tiles.crops_per_read=2", "data.tiles.tile_size=96", "data.tiles.batched_reads=true"],
], ids=["smart_cache", "crops_and_batched_reads"])
def test_tile_loading_options(tmp_path, options):
    sets = [f"run.root={tmp_path}", f"data.tiles.slides_dir={tmp_path}/slides", f"data.tiles.index_dir={tmp_path}/index",
            "data.tiles.synthesize={slides: 4, size: 2048, seed: 0}", "fl.rounds=2", "fl.local_epochs=1",
            "data.val_fraction=0.5", *options]
    r = hpcfl("launch", "configs/quickstart.yaml", *[a for s in sets for a in ("--set", s)], timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(x) for x in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x.get("split") == "train"]
    assert len(train) == 4 and all(x["samples"] > 0 and x["steps"] > 0 for x in train)
    if "smart_cache" in options[0]:
        assert all(x["steps"] == 2 for x in train)  # 1 epoch of 64 cached tiles per rank, batches of 32


def test_smart_cache_with_crops_is_refused_in_one_line(tmp_path):
    sets = [f"run.root={tmp_path}", f"data.tiles.slides_dir={tmp_path}/slides", f"data.tiles.index_dir={tmp_path}/index",
            "data.tiles.synthesize={slides: 4, size: 2048, seed: 0}", "fl.rounds=1",
            "data.tiles.smart_cache={cache_num: 8}", "data.tiles.crops_per_read=2"]
    r = hpcfl("launch", "configs/quickstart.yaml", *[a for s in sets for a in ("--set", s)], timeout=400)
    assert r.returncode != 0
    assert "data.tiles.smart_cache: use it with crops_per_read: 1" in r.stderr.strip().splitlines()[-1]


def test_tile_run_resumed_after_a_kill_ends_bit_identical(tmp_path):
    """Augmentation is seeded per item and batches come from a prefetch thread: a resumed run must still
    train on exactly the batches of an uninterrupted one."""
    import numpy as np

    from hpcfl.checkpoint import load_checkpoint

    def launch(name, *extra):
        sets = [f"run.root={tmp_path}", f"run.name={name}", f"data.tiles.slides_dir={tmp_path}/slides",
                f"data.tiles.index_dir={tmp_path}/index", "data.tiles.synthesize={slides: 4, size: 2048, seed: 0}",
                "fl.rounds=3", "fl.local_epochs=1", "data.val_fraction=0.5", *extra]
        return hpcfl("launch", "configs/quickstart.yaml", *[a for s in sets for a in ("--set", s)], timeout=400)

    a = launch("straight")
    assert a.returncode == 0, a.stdout + a.stderr
    b = launch("resumed", "debug.inject_failure={rank: 0, round: 3, mode: kill}")
    assert b.returncode != 0
    c = launch("resumed")
    assert c.returncode == 0 and "resuming after round 2" in c.stdout, c.stdout + c.stderr
    wa = load_checkpoint(tmp_path / "straight" / "checkpoints" / "round-000003.npz")["model"]
    wc = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "round-000003.npz")["model"]
    assert wa.keys() == wc.keys() and all(np.array_equal(wa[k], wc[k]) for k in wa)
