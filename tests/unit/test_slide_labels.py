"""Slide labels: the CSV checked against the slides (one line per kind of problem), and the labelled
synthetic slides (a tumour focus in a minority of tiles, per-hospital prevalence and stain shift)."""
from __future__ import annotations

import numpy as np
import pytest

from hpcfl.errors import ConfigError
from hpcfl.wsi.labels import class_order, owned_by_site, read_labels
from hpcfl.wsi.synth import LabelPlan, _labelled_plan

IDS = ["s1", "s2", "s3", "s4"]


def csv(tmp_path, text, name="labels.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_labels_in_slide_order_with_the_positive_class_second(tmp_path):
    lab = read_labels(csv(tmp_path, "slide_id,label\ns3,tumour\ns1,normal\ns2,tumour\ns4,normal\n"), IDS)
    assert lab.slide_ids == IDS and lab.classes == ["normal", "tumour"] and lab.labels == [0, 1, 1, 0]
    assert lab.sites is None
    assert class_order(["10", "2", "1"]) == ["1", "2", "10"]  # numeric labels in numeric order


@pytest.mark.parametrize("text,expect", [
    ("slide_id,label\ns1,a\ns2,b\ns3,a\n", r"labels.csv: 1 slide\(s\) of the index have no label: s4$"),
    ("slide_id,label\ns1,a\ns2,b\ns3,a\ns4,b\nzz,a\n",
     r"labels.csv: 1 row\(s\) name a slide that is not in the index: zz \(line 6\)$"),
    ("slide_id,label\ns1,a\ns2,b\ns3,a\ns4,b\ns2,a\n",
     r"labels.csv: 1 slide\(s\) labelled more than once: s2 \(lines 3 and 6\)$"),
    ("id,diagnosis\ns1,a\n", r"labels.csv: line 1: the header must name the columns slide_id and label"),
    ("slide_id,label\ns1,a\ns2,a\ns3,a\ns4,a\n", r"every slide has the label 'a'"),
    ("slide_id,label\ns1,\ns2,b\ns3,a\ns4,b\n", r"1 row\(s\) with an empty label: s1 \(line 2\)$"),
])
def test_each_problem_is_one_line_naming_file_slide_and_line(tmp_path, text, expect):
    with pytest.raises(ConfigError, match=expect) as e:
        read_labels(csv(tmp_path, text), IDS)
    assert str(tmp_path) in str(e.value)


def test_several_problems_one_line_each(tmp_path):
    with pytest.raises(ConfigError) as e:
        read_labels(csv(tmp_path, "slide_id,label\ns1,a\ns1,b\nzz,a\n"), IDS)
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(str(tmp_path / "labels.csv")) for line in lines)
    assert "s2, s3, s4" in str(e.value) and "zz (line 4)" in str(e.value) and "s1 (lines 2 and 3)" in str(e.value)


def test_site_column_gives_each_site_its_slides_and_names_unknown_sites(tmp_path):
    p = csv(tmp_path, "slide_id,label,site\ns1,a,h1\ns2,b,h2\ns3,b,h1\ns4,a,h2\n")
    lab = read_labels(p, IDS, ["h1", "h2"])
    assert [x.tolist() for x in owned_by_site(lab, IDS, ["h1", "h2"])] == [[0, 2], [1, 3]]
    with pytest.raises(ConfigError, match=r"name a site the config does not have \(h1, h3\): s2: 'h2' \(line 3\)"):
        read_labels(p, IDS, ["h1", "h3"])
    with pytest.raises(ConfigError, match=r"fewer than 3 slides in its site column: h1 \(2\), h2 \(2\)"):
        owned_by_site(lab, IDS, ["h1", "h2"], min_per_site=3)


def test_cli_prints_one_line_per_problem(tmp_path):
    from conftest import hpcfl

    from hpcfl.features.store import weights_digest  # noqa: F401 - importable without torch

    feats = tmp_path / "features"
    feats.mkdir()
    for s in IDS:
        (feats / f"{s}.npz").write_bytes(b"")
    p = csv(tmp_path, "slide_id,label,site\ns1,a,hospital-a\ns1,b,hospital-a\nzz,a,hospital-b\n")
    r = hpcfl("launch", "configs/pathology.yaml", "--set", "pipeline.stages=[mil]", "--set", f"data.bags.dir={feats}",
              "--set", f"data.bags.labels={p}", "--set", f"run.root={tmp_path}/runs", "--no-report", timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if str(p) in x]
    assert len(lines) == 3, r.stderr
    assert "Traceback" not in r.stderr


def test_label_plan_gives_each_hospital_both_labels_at_its_prevalence():
    plan = LabelPlan(hospitals=2, prevalence=(0.25, 0.75))
    got = plan.assign(0, 40)
    assert [h for h, _ in got] == [i % 2 for i in range(40)]
    tumours = [sum(t for h, t in got if h == k) for k in range(2)]
    assert tumours == [5, 15]
    assert plan.assign(0, 40) == got and plan.assign(1, 40) != got  # seeded
    a, b = plan.shift(0, 0), plan.shift(0, 1)
    assert not np.allclose(a[0], b[0]) and a[2] > 0


def test_tumour_is_the_third_planned_region_and_never_fills_other_cells():
    required, pool, fill = _labelled_plan(4, True)
    assert pool[2] == 1 and 1 not in required and 1 not in fill  # 1 = tumor, the third planned region
    assert 1 not in _labelled_plan(4, False)[1]


# ---------------------------------------------------------------------------------------- pattern: atypia

def _focus_pair(i=0, size=1024):
    """Slide i rendered with the malignant and with the benign focus (same seed: same slide otherwise)."""
    from hpcfl.wsi.synth import _TUMOR, _render

    req, pool, fill = _labelled_plan(i, False, focus_always=True)
    shift = LabelPlan().shift(0, 0)
    return [_render(np.random.default_rng([0, i]), size, req, pool, 8, fill, shift, atypia) for atypia in (True, False)], _TUMOR


def test_atypia_changes_only_the_focus_nuclei_not_its_colour():
    from scipy import ndimage as ndi

    ((mal, mask_m), (ben, mask_b)), tumor = _focus_pair()
    assert np.array_equal(mask_m, mask_b) and (mask_m == tumor + 1).mean() > 0.05  # same focus, on both labels
    focus = np.kron(mask_m == tumor + 1, np.ones((8, 8), bool))[:mal.shape[0], :mal.shape[1]]
    near = ndi.binary_dilation(focus, iterations=24)
    differ = np.any(mal != ben, axis=2)
    assert differ[focus].mean() > 0.3 and not differ[~near].any()  # nothing outside the focus changes
    # matched colour: the focus's mean RGB within 2.5 grey levels, well inside the slides' stain spread
    assert np.abs(mal[focus].mean(0) - ben[focus].mean(0)).max() < 2.5
    # ... made by nuclei of equal mean area and equal total haematoxylin, but of very different shape variety
    from hpcfl.wsi.synth import _atypia_banks

    mal_bank, ben_bank = _atypia_banks(np.random.default_rng(3))
    area = lambda bank: np.array([v.size for *_, v in bank], float)  # noqa: E731
    mass = lambda bank: sum(float(v.sum()) for *_, v in bank)  # noqa: E731
    assert mass(mal_bank) == pytest.approx(mass(ben_bank), rel=1e-5)
    assert area(mal_bank).mean() == pytest.approx(area(ben_bank).mean(), rel=0.15)
    cv = lambda a: a.std() / a.mean()  # noqa: E731
    assert cv(area(mal_bank)) > 4 * cv(area(ben_bank))


def test_atypia_slides_all_have_a_focus_and_the_manifest_records_the_pattern(tmp_path):
    import json

    from hpcfl.wsi.synth import synthesize_slides

    infos = synthesize_slides(tmp_path, 4, 512, 0, labels=LabelPlan(pattern="atypia"), progress=False)
    assert all("tumor" in s.classes_present for s in infos)
    rows = (tmp_path / "labels.csv").read_text().splitlines()[1:]
    assert sorted({r.split(",")[1] for r in rows}) == ["normal", "tumour"]
    assert json.loads((tmp_path / "slides.json").read_text())["labels"]["pattern"] == "atypia"
    with pytest.raises(ValueError, match="pattern must be one of focus, atypia"):
        LabelPlan(pattern="glands")


def test_switching_the_pattern_makes_the_slides_and_their_index_again(tmp_path, capsys):
    import json

    from hpcfl.config import from_dict
    from hpcfl.wsi.prepare import prepare_tiles

    def cfg(pattern):
        return from_dict({"sites": [{"name": "a"}], "data": {"name": "tiles", "tiles": {
            "slides_dir": str(tmp_path / "slides"), "index_dir": str(tmp_path / "index"), "level": 0, "tile_size": 64,
            "synthesize": {"slides": 4, "size": 512, "seed": 0, "hospitals": 2, "prevalence": [0.5, 0.5],
                           "pattern": pattern}}}})

    def tumour_slides():
        index = json.loads((tmp_path / "index" / "index.json").read_text())
        return index, (tmp_path / "slides" / "slides.json").read_text()

    prepare_tiles(cfg("focus"), progress=False)
    before = json.loads((tmp_path / "slides" / "slides.json").read_text())
    prepare_tiles(cfg("atypia"), progress=False)
    assert "synthesizing them again" in capsys.readouterr().err
    after = json.loads((tmp_path / "slides" / "slides.json").read_text())
    assert "pattern" not in before["labels"] and after["labels"]["pattern"] == "atypia"
    assert all("tumor" in s["classes_present"] for s in after["slides"])
    from hpcfl.wsi.index import load_index

    idx = load_index(tmp_path / "index")  # retiled: every slide now has tumour-class tiles
    tumor = idx.classes.index("tumor")
    assert all((idx.label[idx.slide == s] == tumor).any() for s in range(4))
