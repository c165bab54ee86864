"""Looking at a run: metrics as scalars, TensorBoard events (without torch), MLflow, console progress, thumbnails."""
import io
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT
from reference_impl import rounds_scalars

from hpcfl.config import from_dict
from hpcfl.console import plain_lines, progress_iter
from hpcfl.observe.scalars import cross_site_scalars, flatten, record_scalars
from hpcfl.observe.sinks import Observers, observers_for

SITE_VAL = {"kind": "site", "round": 2, "site": "a", "split": "val", "model": "global", "status": "dropout",
            "loss": 0.5, "accuracy": 0.75, "samples": 40, "recall": [0.5, 1.0]}
SITE_TRAIN = {"kind": "site", "round": 2, "site": "a", "split": "train", "model": "local", "loss": 1.25, "steps": 4}
ROUND = {"kind": "round", "round": 2, "sites_done": 1, "participants": ["b"], "dropped": {"a": "dropout"},
         "val_accuracy": 0.625, "skipped": True, "timestamp": 1000.0, "time": {"train_s": 2.5, "round_s": 3.0},
         "best": {"metric": "val_accuracy", "value": 0.7, "round": 1}}


def records(rounds=3):
    """A small federation's metrics.jsonl: 2 sites, a round summary per round."""
    out = []
    for r in range(1, rounds + 1):
        for i, site in enumerate(["hospital-a", "hospital-b"]):
            out.append({"kind": "site", "round": r, "site": site, "split": "val", "model": "global",
                        "status": "returned" if (r + i) % 3 else "straggler", "loss": 1.0 / (r + i),
                        "accuracy": 0.1 * r + 0.01 * i, "samples": 50 + i})
            out.append({"kind": "site", "round": r, "site": site, "split": "val", "model": "local",
                        "status": "returned", "loss": 0.9 / r, "accuracy": 0.11 * r + 0.02 * i, "samples": 50})
            out.append({"kind": "site", "round": r, "site": site, "split": "train", "model": "local",
                        "loss": 2.0 / r, "samples": 200, "steps": 4, "train_s": 0.3 + 0.01 * r, "update_norm": 0.2})
        out.append({"kind": "round", "round": r, "sites_done": 2, "sites_total": 2, "participants": ["hospital-a"],
                    "dropped": {}, "val_loss": 1.5 / r, "val_accuracy": 0.1 * r + 0.005, "timestamp": 1e9 + r,
                    "local_val_accuracy": 0.12 * r, "dp_epsilon": 0.7 * r,
                    "time": {"send_s": 0.01, "train_s": 0.3 * r, "data_s": 0.05, "compute_s": 0.2, "allreduce_s": 0.01,
                             "upload_s": 0.02, "aggregate_s": 0.001, "eval_s": 0.04, "checkpoint_s": 0.03,
                             "round_s": 0.5 * r, "overhead_s": 0.1}})
    return out


# -- the mapping --------------------------------------------------------------------------------------------------
def test_flatten_keeps_numbers_and_numeric_lists_only():
    assert dict(flatten({"a": 1, "b": {"c": 2.5, "d": "x"}, "e": [1, 2], "f": ["x"], "g": True, "h": None})) == \
        {"a": 1.0, "b/c": 2.5, "e/0": 1.0, "e/1": 2.0, "g": 1.0}


def test_record_scalars_by_kind():
    assert set(record_scalars(SITE_VAL)) == {
        ("sites/a", "val/global/loss", 0.5), ("sites/a", "val/global/accuracy", 0.75),
        ("sites/a", "val/global/samples", 40.0), ("sites/a", "val/global/recall/0", 0.5),
        ("sites/a", "val/global/recall/1", 1.0), ("sites/a", "participation", 0.0)}
    assert set(record_scalars(SITE_TRAIN)) == {("sites/a", "train/local/loss", 1.25), ("sites/a", "train/local/steps", 4.0)}
    assert set(record_scalars(ROUND)) == {
        ("", "sites_done", 1.0), ("", "val_accuracy", 0.625), ("", "skipped", 1.0), ("", "timestamp", 1000.0),
        ("", "time/train_s", 2.5), ("", "time/round_s", 3.0), ("", "best/value", 0.7), ("", "best/round", 1.0)}
    # a task's own record kinds keep their kind as a prefix (nothing to register)
    assert record_scalars({"kind": "dino", "round": 1, "site": "a", "teacher_entropy": 3.5}) == \
        [("sites/a", "dino/teacher_entropy", 3.5)]
    assert record_scalars({"kind": "dino", "round": 1, "koleo": 0.25}) == [("", "dino/koleo", 0.25)]
    assert cross_site_scalars({"models": {"global": {"a": {"accuracy": 0.5, "recall": [1, 0]}}}}) == [
        ("sites/a", "cross_site/global/accuracy", 0.5), ("sites/a", "cross_site/global/recall/0", 1.0),
        ("sites/a", "cross_site/global/recall/1", 0.0)]


# -- TensorBoard -----------------------------------------------------------------------------------------------
def expected(recs):
    """{(series, tag): {step: float32 value}}: what TensorBoard must hold for these records."""
    want = {}
    for step, (series, tag, v) in rounds_scalars(recs):
        want.setdefault((series, tag), {})[step] = float(np.float32(v))
    return want


WRITE = """
import json, sys
from types import SimpleNamespace
from hpcfl.config import from_dict
from hpcfl.observe import observers_for
cfg = from_dict({"sites": [{"name": "hospital-a"}, {"name": "hospital-b"}], "run": {"root": sys.argv[1]}})
obs = observers_for(cfg, sys.argv[2], int(sys.argv[3]))
obs.records(json.load(open(sys.argv[4])))
obs.finish(sys.argv[2])
assert "torch" not in sys.modules, "writing TensorBoard events imported torch"
assert "tensorflow" not in sys.modules and "mlflow" not in sys.modules
print("ok")
"""


def write_events(tmp_path, recs, start_round=1):
    src = tmp_path / f"recs-{start_round}.json"
    src.write_text(json.dumps(recs))
    r = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path), str(tmp_path / "run"), str(start_round), str(src)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_tensorboard_events_read_back_equal_the_records_and_torch_is_never_imported(tmp_path):
    from reference_impl import read_scalars

    recs = records(3)
    write_events(tmp_path, recs)
    got = read_scalars(tmp_path / "run" / "tb")
    want = expected(recs)
    assert got == want
    assert ("sites/hospital-b", "val/local/accuracy") in got and ("", "time/round_s") in got
    assert got[("sites/hospital-a", "participation")] == {1: 1.0, 2: 1.0, 3: 0.0}  # round 3: (3 + 0) % 3 == 0, straggler


def test_a_resumed_run_replaces_the_rounds_after_its_checkpoint(tmp_path):
    from reference_impl import read_scalars

    write_events(tmp_path, records(4))  # rounds 1-4 written, but say the checkpoint was round 2
    time.sleep(1.1)  # event file names carry the second they were created: the resumed file sorts after
    again = [dict(r, val_accuracy=0.9) if r["kind"] == "round" else r for r in records(5) if r["round"] >= 3]
    write_events(tmp_path, again, start_round=3)
    got = read_scalars(tmp_path / "run" / "tb")[("", "val_accuracy")]
    assert got == {1: float(np.float32(0.105)), 2: float(np.float32(0.205)), 3: float(np.float32(0.9)),
                   4: float(np.float32(0.9)), 5: float(np.float32(0.9))}


class Boom:
    def __init__(self):
        self.calls = 0

    def write(self, *a):
        self.calls += 1
        raise OSError("No space left on device")

    def flush(self):
        pass

    def close(self):
        pass


class Keep:
    def __init__(self):
        self.steps = []

    def write(self, step, scalars, wall):
        self.steps.append((step, len(scalars), wall))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_a_failing_sink_is_dropped_with_one_line_and_the_others_go_on():
    lines, boom, keep = [], Boom(), Keep()
    obs = Observers({"tensorboard": boom, "other": keep}, warn=lines.append)
    obs.records(records(2))
    assert boom.calls == 1 and [s for s, _, _ in keep.steps] == [1, 2]
    assert keep.steps[0][2] == 1e9 + 1  # the round's own timestamp is the event's wall time
    assert len(lines) == 1 and "tensorboard" in lines[0] and "No space left" in lines[0]
    obs.finish()
    assert keep.closed


def cfg_for(tmp_path, **observe):
    return from_dict({"sites": [{"name": "hospital-a"}, {"name": "hospital-b"}], "run": {"root": str(tmp_path)},
                      "fl": {"rounds": 3}, "observe": observe})


def test_observe_config_keys():
    cfg = from_dict({"sites": [{"name": "a"}]})
    assert cfg.observe.tensorboard is True and cfg.observe.mlflow is None
    cfg = from_dict({"sites": [{"name": "a"}], "observe": {"tensorboard": False, "mlflow": {"experiment": "x"}}})
    assert cfg.observe.mlflow.experiment == "x" and cfg.observe.mlflow.tracking_uri == ""
    with pytest.raises(Exception, match="observe.mlflow.experimnt"):
        from_dict({"sites": [{"name": "a"}], "observe": {"mlflow": {"experimnt": "x"}}})


def test_progress_feeds_the_observers_from_the_records_or_from_metrics_jsonl(tmp_path):
    from reference_impl import read_scalars
    from hpcfl.report import Progress

    cfg = cfg_for(tmp_path)
    run = tmp_path / "r"
    run.mkdir()
    rundir = SimpleNamespace(path=run, metrics_path=run / "metrics.jsonl")
    topo = SimpleNamespace(world_size=3, sites=[SimpleNamespace(name="hospital-a", size=1),
                                                SimpleNamespace(name="hospital-b", size=1)])
    out = io.StringIO()
    p = Progress(cfg, topo, rundir, 1, stream=out)
    recs = records(3)
    by_round = [[r for r in recs if r["round"] == k] for k in (1, 2, 3)]
    p.round_done(by_round[0][-1], by_round[0])  # the records handed over
    with open(rundir.metrics_path, "a") as f:  # ... or read back from what rank 0 appended
        for k in (1, 2):
            f.write("".join(json.dumps(r) + "\n" for r in by_round[k]))
            f.flush()
            p.round_done(by_round[k][-1])
    p.finish(by_round[2][-1])
    assert read_scalars(run / "tb") == expected(recs)
    text = out.getvalue()
    assert "round 3/3" in text and f"tensorboard --logdir {run / 'tb'}" in text
    assert not any(c in text for c in "\r\x1b\b"), "control characters in rank 0's per-round lines"


# -- MLflow -------------------------------------------------------------------------------------------------------
def test_mlflow_logs_every_scalar_and_a_resumed_run_continues_its_mlflow_run(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow-skinny is in requirements.txt")
    from mlflow.tracking import MlflowClient

    cfg = cfg_for(tmp_path, tensorboard=False, mlflow={"experiment": "h2-test"})
    run = tmp_path / "r"
    run.mkdir()
    obs = observers_for(cfg, run)
    recs = records(2)
    obs.records(recs)
    obs.finish(run)
    state = json.loads((run / "mlflow.json").read_text())
    assert state["tracking_uri"] == (tmp_path / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    got = client.get_run(state["run_id"])
    assert got.info.status == "FINISHED" and got.data.params["fl.rounds"] == "3"
    for step, (series, tag, v) in rounds_scalars(recs):
        key = f"{series}/{tag}" if series else tag
        hist = {m.step: m.value for m in client.get_metric_history(state["run_id"], key)}
        assert hist[step] == pytest.approx(v, rel=1e-12, abs=0), key
    obs = observers_for(cfg, run, start_round=3)  # resume: the same MLflow run
    obs.records(records(3)[-7:])
    obs.finish(run)
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == state["run_id"]
    assert [m.step for m in client.get_metric_history(state["run_id"], "val_accuracy")] == [1, 2, 3]


def test_mlflow_off_by_default_is_never_imported(tmp_path):
    code = ("import sys; from hpcfl.config import from_dict; from hpcfl.observe import observers_for; "
            f"o = observers_for(from_dict({{'sites': [{{'name': 'a'}}]}}), {str(tmp_path)!r}); "
            "print(sorted(o.sinks), 'mlflow' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.strip() == "['tensorboard'] False False", r.stderr


# -- console progress ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_plain_progress_lines_are_periodic_and_free_of_control_characters():
    out = io.StringIO()
    assert list(plain_lines(list("abcdef"), "tiling", "slide", out, every_s=10.0, clock=Clock(4.0))) == list("abcdef")
    lines = out.getvalue().splitlines()
    # clock: start 4, items end at 8, 12, 16, 20, 24, 28 -> a line at 16 (12 s after 4), at 28 (12 s later; last)
    assert lines == ["tiling: 3/6 slides (50%), 12s elapsed, ETA 12s", "tiling: 6/6 slides (100%), 24s elapsed"]
    assert not any(c in out.getvalue() for c in "\r\x1b\b")


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar_and_a_file_gets_plain_lines():
    from tqdm import tqdm

    assert isinstance(progress_iter(range(3), "x", "item", Tty()), tqdm)
    out = io.StringIO()
    assert list(progress_iter(range(3), "x", "item", out)) == [0, 1, 2]
    assert out.getvalue() == "x: 3/3 items (100%), 0s elapsed\n"


# -- thumbnails ----------------------------------------------------------------------------------------------------
def test_thumbnail_is_capped_and_labels_and_classes_have_their_own_colours(tmp_path):
    from PIL import Image

    from hpcfl.wsi.tiling import CLASS_COLOURS, LABEL_COLOURS, TiledSlide, draw_thumbnail

    h, w, side = 2967, 2220, 128
    img = np.full((h, w, 3), 240, np.uint8)
    xs, ys = np.meshgrid(np.arange(0, w - side + 1, side), np.arange(0, h - side + 1, side))
    x, y = xs.ravel(), ys.ravel()
    label = np.where(x < 640, "white_background", np.where(x < 1280, "partial_tissue", "tissue")).astype(object)
    cls = np.where(x >= 1280, (y // side) % 2, -1)
    t = TiledSlide({"x": x, "y": y, "tile_label": label, "class_id": cls}, img, 1.0, side, ["stroma", "tumor"])
    draw_thumbnail(t, tmp_path / "s.png")
    im = Image.open(tmp_path / "s.png").convert("RGB")
    assert max(im.size) == 2048 and im.size[0] == pytest.approx(2048 * w / h, abs=40)
    colours = {tuple(c) for c in np.asarray(im).reshape(-1, 3)}
    for c in (LABEL_COLOURS["tissue"], LABEL_COLOURS["partial_tissue"], CLASS_COLOURS[0], CLASS_COLOURS[1]):
        assert c in colours, f"{c} not drawn (outline or legend swatch)"
    small = np.full((300, 200, 3), 240, np.uint8)
    draw_thumbnail(TiledSlide({"x": x[:0], "y": y[:0], "tile_label": label[:0], "class_id": cls[:0]}, small, 4.0, 64.0,
                              []), tmp_path / "small.png")
    im = Image.open(tmp_path / "small.png")
    assert im.size[0] == 200 and 300 < im.size[1] <= 360  # never upscaled; the legend strip below it


def test_synth_slides_shows_plain_progress_when_not_on_a_terminal(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcfl", "synth-slides", str(tmp_path / "s"), "--slides", "2",
                        "--size", "512"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "synthesizing slides: 2/2 slides (100%)" in r.stderr
    assert not any(c in r.stderr for c in "\r\x1b")


def test_time_breakdown_stacks_phases_that_add_up_to_the_round():
    """A quickstart round record (round 1, as written): site_train_s is the sum of data, compute and allreduce
    and their rest, so stacking it too drew a 7.7 s bar for a 5.8 s round."""
    from hpcfl.observe.plots import time_stack

    t = {"send_s": 0.05, "site_bcast_s": 0.02, "train_s": 3.9, "site_train_s": 1.9, "data_s": 0.4,
         "compute_s": 1.2, "allreduce_s": 0.2, "upload_s": 0.1, "aggregate_s": 0.03, "eval_s": 1.0,
         "checkpoint_s": 0.1, "wait_upload_s": 4.0, "wait_eval_s": 1.1, "round_s": 5.8, "overhead_s": 1.9}
    xs, keys, values = time_stack([{"round": 1, "time": t}])
    assert xs == [1] and "site_train_s" not in keys and "train_s" not in keys
    assert values["train_other_s"] == [pytest.approx(3.9 - 0.4 - 1.2 - 0.2)]
    assert sum(v[0] for v in values.values()) == pytest.approx(5.8)  # the bar is the round, no more
    assert values["other_s"][0] == pytest.approx(5.8 - (0.05 + 0.02 + 3.9 + 0.1 + 0.03 + 1.0 + 0.1))


def test_other_round_metrics_leave_out_constants():
    from hpcfl.observe.plots import varying_round_metrics

    rounds = [{"round": r, "retries": 0, "sim_time_s": 0.0, "num_train": 1437, "update_norm": 1.0 / r,
               "val_accuracy": 0.5 + r / 10, "nan_metric": float("nan")} for r in (1, 2, 3)]
    assert varying_round_metrics(rounds) == ["update_norm"]
    assert varying_round_metrics(rounds[:1]) == ["retries", "sim_time_s", "num_train", "update_norm"]
