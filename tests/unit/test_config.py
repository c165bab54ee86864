from pathlib import Path

import pytest

from hpcfl.config import apply_override, config_hash, from_dict, load_config, parse_yaml
from hpcfl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"sites": [{"name": "a", "ranks": 2}, {"name": "b"}]}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.world_size >= 2 and cfg.run.name == path.stem


def test_defaults_and_world_size():
    cfg = from_dict(BASE)
    assert cfg.world_size == 4
    assert cfg.sites[1].ranks == 1
    assert cfg.site_local(cfg.sites[0]) == (1, None)


def test_scientific_notation_is_a_number():
    assert parse_yaml("lr: 1e-3") == {"lr": 0.001}
    cfg = from_dict({**BASE, "train": {"lr": "1e-3"}})
    assert cfg.train.lr == pytest.approx(1e-3)
    cfg = from_dict(parse_yaml("sites: [{name: a}]\ntrain: {lr: 1e-3, weight_decay: 5E-4}"))
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"x.yaml: train.lrr: unknown key \(did you mean 'lr'\?\)"):
        from_dict({**BASE, "train": {"lrr": 0.1}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"sites\[0\].rank: unknown key \(did you mean 'ranks'\?\)"):
        from_dict({"sites": [{"name": "a", "rank": 2}]}, "x.yaml")


@pytest.mark.parametrize("raw,match", [
    ({"fl": {"rounds": 0}}, r"fl.rounds: must be >= 1, got 0"),
    ({"fl": {"rounds": "ten"}}, r"fl.rounds: expected an integer"),
    ({"fl": {"rounds": 2.5}}, r"fl.rounds: expected an integer"),
    ({"train": {"lr": 0}}, r"train.lr: must be > 0.0"),
    ({"train": {"optimizer": "adamw"}}, r"train.optimizer: 'adamw' is not one of sgd, adam \(did you mean 'adam'\?\)"),
    ({"fl": {"local_epochs": 1, "local_steps": 5}}, r"fl: set local_epochs or local_steps, not both"),
    ({"data": {"val_fraction": 1.5}}, r"data.val_fraction: must be <= 0.9"),
    ({"model": {"batchnorm": "yes"}}, r"model.batchnorm: expected true or false"),
    ({"debug": {"inject_failure": {"rank": 9, "round": 1}}}, r"debug.inject_failure.rank: 9 is not a rank"),
])
def test_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({**BASE, **raw}, "c.yaml")


def test_site_errors():
    with pytest.raises(ConfigError, match=r"sites\[0\].ranks: must be >= 1"):
        from_dict({"sites": [{"name": "a", "ranks": 0}]})
    with pytest.raises(ConfigError, match=r"sites\[1\].name: duplicate site name 'a'"):
        from_dict({"sites": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"sites: required key is missing"):
        from_dict({})
    with pytest.raises(ConfigError, match=r"sites\[0\].name: 'a b'"):
        from_dict({"sites": [{"name": "a b"}]})


def test_sites_shorthand():
    cfg = from_dict({"sites": {"count": 4, "ranks": 2}})
    assert [s.name for s in cfg.sites] == ["site1", "site2", "site3", "site4"] and cfg.world_size == 9


def test_overrides():
    cfg = from_dict(BASE, "c.yaml", ["fl.rounds=3", "train.lr=1e-2", "sites.1.ranks=3", "model.hidden=[8, 4]"])
    assert (cfg.fl.rounds, cfg.train.lr, cfg.sites[1].ranks, cfg.model.hidden) == (3, 0.01, 3, (8, 4))
    cfg = from_dict(BASE, "c.yaml", ["debug.inject_failure={rank: 1, round: 1, mode: kill}"])
    assert cfg.debug.inject_failure.mode == "kill"
    with pytest.raises(ConfigError, match=r"--set fl: expected key.path=value"):
        from_dict(BASE, "c.yaml", ["fl"])
    with pytest.raises(ConfigError, match=r"fl.roundz: unknown key \(did you mean 'rounds'\?\)"):
        from_dict(BASE, "c.yaml", ["fl.roundz=3"])
    with pytest.raises(ConfigError, match=r"index out of range"):
        from_dict(BASE, "c.yaml", ["sites.5.ranks=3"])


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sites:\n  - name: a\nfl:\n  rounds: 3\n  rounds: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 5: invalid YAML: duplicate key 'rounds'"):
        load_config(p)
    p.write_text("sites: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_hash_ignores_rounds_and_paths_but_not_training():
    a = from_dict(BASE)
    assert config_hash(a) == config_hash(from_dict(BASE, overrides=["fl.rounds=50", "run.root=/x"]))
    assert config_hash(a) != config_hash(from_dict(BASE, overrides=["train.lr=0.2"]))
    assert config_hash(a) != config_hash(from_dict(BASE, overrides=["run.seed=1"]))


def test_overriding_steps_replaces_epochs_from_the_file():
    cfg = from_dict({**BASE, "fl": {"local_epochs": 2}}, "c.yaml", ["fl.local_steps=5"])
    assert cfg.site_local(cfg.sites[0]) == (None, 5)
    cfg = from_dict({**BASE, "fl": {"local_steps": 5}}, "c.yaml", ["fl.local_epochs=3"])
    assert cfg.site_local(cfg.sites[0]) == (3, None)


def test_apply_override_creates_nested_keys():
    raw = {}
    apply_override(raw, "a.b.c=1")
    assert raw == {"a": {"b": {"c": 1}}}
