from conftest import hpcfl


def test_help_lists_the_commands():
    r = hpcfl("--help")
    assert r.returncode == 0
    for cmd in ("launch", "run", "validate"):
        assert cmd in r.stdout


def test_validate_ok_and_error():
    r = hpcfl("validate", "configs/digits-2x2.yaml", "--set", "fl.rounds=3")
    assert r.returncode == 0, r.stderr
    assert "5 ranks = 1 aggregator + site 'hospital-a' (2), site 'hospital-b' (2); 3 rounds" in r.stdout
    r = hpcfl("validate", "configs/digits-2x2.yaml", "--set", "train.lrate=3")
    assert r.returncode == 2
    assert r.stderr.strip() == "hpcfl: configs/digits-2x2.yaml: train.lrate: unknown key (did you mean 'lr'?)"


def test_launch_dry_run_prints_argv(tmp_path):
    r = hpcfl("launch", "configs/digits.yaml", "--dry-run", "--set", f"run.root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "-np 3" in r.stdout and "hpcfl run configs/digits.yaml" in r.stdout
