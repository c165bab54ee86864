"""configs/pathology.yaml's pipeline as `hpcfl launch` plans it (dry run), and its bad settings in one line."""
from conftest import hpcfl


def test_dry_run_lists_the_stages_in_order(tmp_path):
    r = hpcfl("launch", "configs/pathology.yaml", "--dry-run", "--set", f"run.root={tmp_path}",
              "--set", f"pipeline.pretrain_set=[run.root={tmp_path}]")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.index("pipeline: pretrain: configs/pathology-dino.yaml") < out.index("hpcfl run configs/pathology-dino.yaml")
    assert out.index("pipeline: features: hpcfl features") < out.index("pipeline: mil: configs/pathology.yaml")
    assert f"{tmp_path}/pathology-dino --out data/pathology/features" in out
    one = hpcfl("launch", "configs/pathology.yaml", "--dry-run", "--set", "pipeline.stages=[mil]",
                "--set", f"run.root={tmp_path}")
    assert "pretrain" not in one.stdout and "pipeline: mil" in one.stdout


def test_bad_stage_and_missing_pretrain_are_one_line(tmp_path):
    r = hpcfl("launch", "configs/pathology.yaml", "--dry-run", "--set", "pipeline.stages=[pretrain, tile]")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "pipeline.stages: ['tile'] - choose from pretrain, features, mil" in r.stderr
    r = hpcfl("launch", "configs/pathology.yaml", "--dry-run", "--set", "pipeline.pretrain=")
    assert r.returncode == 2 and "pipeline.pretrain: the pretrain and features stages need" in r.stderr
    r = hpcfl("validate", "configs/pathology.yaml", "--set", "data.name=tiles")
    assert r.returncode == 2 and "task: mil learns from slide feature bags: set data.name: features" in r.stderr
