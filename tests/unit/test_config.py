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
    ({"train": {"optimizer": "adma"}}, r"train.optimizer: 'adma' is not one of sgd, adam(, adamw)? \(did you mean 'adam'\?\)"),
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


# -- hostile or mistaken input: one ConfigError naming the file and key ------------------------------


@pytest.mark.parametrize("text,key", [
    ("fl: {rounds: .nan}", "fl.rounds"), ("fl: {rounds: -.inf}", "fl.rounds"), ("train: {momentum: .nan}", "train.momentum"),
    ("train: {lr: .inf}", "train.lr"), ("model: {conv_blocks: .NaN}", "model.conv_blocks"),
    ("privacy: {dp: {noise_multiplier: .nan}}", "privacy.dp.noise_multiplier"),
])
def test_non_finite_numbers_are_refused(text, key):
    with pytest.raises(ConfigError, match=rf"^x.yaml: {key}: must be a finite (number|integer), got"):
        from_dict(parse_yaml("sites: [{name: a}]\n" + text), "x.yaml")
    with pytest.raises(ConfigError, match=rf"x.yaml: {key}: must be a finite"):
        from_dict(BASE, "x.yaml", overrides=[f"{key}=.nan"])


def test_merge_keys_merge_and_the_mapping_wins():
    doc = parse_yaml("a: &a {x: 1, y: 2}\nb: &b {z: 3}\nc: {<<: [*a, *b], y: 9}\nd: {<<: *a}\n")
    assert doc["c"] == {"x": 1, "y": 9, "z": 3} and doc["d"] == {"x": 1, "y": 2}
    with pytest.raises(ConfigError, match=r"line 5: invalid YAML: duplicate key 'y'"):
        parse_yaml("a: &a {x: 1}\nc:\n  <<: *a\n  y: 1\n  y: 2\n")


def test_alias_expansion_and_nesting_are_bounded():
    from hpcfl.config import MAX_YAML_DEPTH, MAX_YAML_NODES

    fine = parse_yaml("a: &a [1, 2]\nb: [*a, *a, *a]")  # aliases as such are fine
    assert fine["b"] == [[1, 2]] * 3
    n = 1 + int(MAX_YAML_NODES ** 0.5)
    bomb = f"a: &a [{', '.join(['1'] * n)}]\nb: [{', '.join(['*a'] * n)}]\n"  # ~n^2 values once expanded
    with pytest.raises(ConfigError, match=rf"line 2: invalid YAML: holds more than {MAX_YAML_NODES} values"):
        parse_yaml(bomb, "x.yaml")
    ok_depth = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    assert parse_yaml(ok_depth) is not None
    with pytest.raises(ConfigError, match=rf"nested more than {MAX_YAML_DEPTH} levels deep"):
        parse_yaml("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
    chain = "a0: &a0 " + "[" * 40 + "]" * 40 + "\n" + "".join(f"a{i}: &a{i} [[[[*a{i - 1}]]]]\n" for i in range(1, 10))
    with pytest.raises(ConfigError, match=r"nested more than .* \(aliases expanded\)"):
        parse_yaml(chain)  # deep only once expanded: 40 + 4 per link


def test_config_files_are_read_as_bounded_utf8_bytes(tmp_path):
    from hpcfl.config import MAX_CONFIG_BYTES, read_config_text

    sparse = tmp_path / "huge.yaml"
    with open(sparse, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB on paper, nothing on disk: refused by its size, not read
    with pytest.raises(ConfigError, match=rf"huge.yaml: {8 << 30} bytes; a config file may have at most {MAX_CONFIG_BYTES}"):
        load_config(sparse)
    with pytest.raises(ConfigError, match=rf"more than {MAX_CONFIG_BYTES} bytes"):
        read_config_text(Path("/dev/zero"))  # no size to check: read up to the cap, then refused
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfsites: [{name: a}]\nmodel: {args: {note: caf\xc3\xa9}}\n")  # UTF-8 with a BOM is fine
    assert load_config(bom).model.args == {"note": "caf\u00e9"}
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"sites: [{name: a}]\nrun: {name: caf\xe9}\n")
    with pytest.raises(ConfigError, match=r"latin.yaml: line 2: not UTF-8 text \(byte 0xe9\)"):
        load_config(latin)


def test_sites_count_and_set_indexes_are_bounded():
    with pytest.raises(ConfigError, match=r"sites.count: must be <= 100000, got 1000000000"):
        from_dict({"sites": {"count": 1e9}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"sites.\u00b2: index out of range"):
        from_dict(BASE, "x.yaml", overrides=["sites.\u00b2.ranks=2"])


@pytest.mark.parametrize("sets, msg", [
    (["fl.strategy=median"], "mean-based strategies"),
    (["privacy.exclude_vars=[1.bias]"], "exclude_vars"),
    (["sites=[{name: a, ranks: 1}, {name: b, ranks: 2}]"], "same number of ranks"),
])
def test_balanced_slots_refuse_what_would_tie_a_site_to_a_slot(sets, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict({"sites": {"count": 6, "ranks": 1}, "launch": {"assign": "balanced"}}, "t.yaml", sets)


def test_a_long_plain_site_list_is_written_back_as_the_shorthand():
    from hpcfl.config import dump_yaml

    cfg = from_dict({"sites": {"count": 300, "ranks": 1}}, "t.yaml")
    text = dump_yaml(cfg)
    assert "count: 300" in text and "site17" not in text
    assert from_dict(parse_yaml(text, "t"), "t").sites == cfg.sites
    odd = from_dict({"sites": {"count": 300, "ranks": 1}}, "t.yaml", ["sites.3.dropout=0.5"])
    assert "site17" in dump_yaml(odd)  # not what the shorthand gives: written in full


def test_no_config_section_declares_a_key_twice():
    """Python keeps the last of two annotations of one name in a class body, silently: a second
    DataConfig.features (a section) once replaced the synthetic data's int features."""
    import ast
    import dataclasses
    import sys

    import hpcfl.config as C

    modules = {sys.modules[c.__module__] for c in vars(C).values() if dataclasses.is_dataclass(c)}
    assert len(modules) >= 5  # the schema and the sections beside their owners (tasks, wsi)
    for mod in modules:
        tree = ast.parse(open(mod.__file__).read())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            names = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            assert len(names) == len(set(names)), (cls.name, sorted(n for n in names if names.count(n) > 1))


def test_the_schema_names_what_the_code_implements():
    """The schema lists strategy and task names without importing aggregation/ or tasks/ (layers): the lists
    must stay those the code implements."""
    from hpcfl.aggregation import STRATEGIES
    from hpcfl.config import STRATEGIES as NAMED
    from hpcfl.config import TASK_CHECKS
    from hpcfl.tasks import BUILTIN

    assert NAMED == STRATEGIES
    assert list(TASK_CHECKS) == list(BUILTIN)
