"""Every command, fed bad input: a non-zero exit, one or two lines on stderr naming the key or file,
no traceback, and nothing written (no run directory, no output file).

The CLI runs in-process (hpcfl.cli.main with captured stdout/stderr) in a fresh working
directory, so that a default ``runs/`` would show up; a few cases also run as ``python -m hpcfl``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from conftest import ROOT, hpcfl
from hpcfl.cli import main

DIGITS = str(ROOT / "configs" / "digits.yaml")
CPU = str(ROOT / "configs" / "cluster-cpu.yaml")
OK = "sites: [{name: a}, {name: b}]\n"


@dataclass
class Case:
    id: str
    argv: List[str]  # "{t}" is replaced by the case's temporary directory
    expect: str  # a substring of stderr: the key, file or argument at fault
    files: Dict[str, object] = field(default_factory=dict)  # relative path -> str | bytes | callable(path)
    env: Dict[str, str] = field(default_factory=dict)  # "{t}" replaced; PATH="{t}/empty" = no SLURM client


def bad(yaml_text, *argv, expect: str, name: str = "bad.yaml", **kw):
    """A config case: the text is written to {t}/bad.yaml and given to the command (validate by default)."""
    return dict(files={name: yaml_text}, argv=list(argv) or ["validate", "{t}/" + name], expect=expect, **kw)


def _bomb() -> str:
    lines = ["sites: [{name: a}]", "model:", "  args:", "    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"  # 10^9 values once expanded, 500 bytes on disk


def _big(path: Path) -> None:
    with open(path, "w") as f:
        f.write(OK)
        f.write(("# " + "x" * 98 + "\n") * 3000)  # 300 kB of comments: over the cap before any parsing


def _locked(path: Path) -> None:
    """A run directory held by a live process of this host (the test's parent) with a fresh heartbeat."""
    import socket

    from hpcfl.rundir import proc_start

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "proc_start": proc_start(os.getppid()),
                                "started_at": "2026-12-01 10:00:00"}))


def _checkpoints(corrupt: bool) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        import numpy as np

        from hpcfl.checkpoint import save_checkpoint

        for r in (1, 2):
            p = save_checkpoint(path, r, {"w": np.arange(8, dtype=np.float32)}, {"config_hash": "x", "records": []})
            if corrupt:
                data = bytearray(p.read_bytes())
                data[len(data) // 2] ^= 0xFF
                p.write_bytes(bytes(data))
    return make


DEEP = "sites: [{name: a}]\nmodel: {args: {x: " + "[" * 10000 + "]" * 10000 + "}}\n"
DEEP_MAP = "sites: [{name: a}]\nmodel:\n  args:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(100)) + \
    "  " * 102 + "v: 1\n"
SET = ["validate", DIGITS, "--set"]
LAUNCH = ["launch", DIGITS, "--dry-run", "--set", "run.root={t}/runs", "--set", f"launch.mpirun={sys.executable}"]
NO_SLURM = {"PATH": "{t}/empty"}
RUN_DIR = "{t}/runs/digits"

CASES = [
    # -- non-finite numbers, in integer and float fields, in the file and in --set
    Case("nan-int", **bad(OK + "fl: {rounds: .nan}\n", expect="fl.rounds")),
    Case("inf-int", **bad(OK + "fl: {rounds: .inf}\n", expect="fl.rounds")),
    Case("nan-float-range", **bad(OK + "train: {momentum: .nan}\n", expect="train.momentum")),
    Case("inf-float", **bad(OK + "train: {lr: .inf}\n", expect="train.lr")),
    Case("minus-inf-float", **bad(OK + "train: {weight_decay: -.inf}\n", expect="train.weight_decay")),
    Case("nan-optional-float", **bad(OK + "fl: {stragglers: {deadline_s: .NaN}}\n", expect="fl.stragglers.deadline_s")),
    Case("nan-site-override", **bad("sites: [{name: a, overrides: {lr: .nan}}]\n", expect="sites[0].overrides.lr")),
    Case("nan-site-dropout", **bad("sites: [{name: a, dropout: .nan}]\n", expect="sites[0].dropout")),
    Case("nan-sites-count", **bad("sites: {count: .nan}\n", expect="sites.count")),
    Case("sites-count-ranks-zero", **bad("sites: {count: 3, ranks: 0}\n", expect="sites.ranks")),
    Case("central-eval-on-tiles", **bad("sites: {count: 2}\ndata: {name: tiles}\neval: {central_fraction: 0.1}\n",
                                        expect="eval.central_fraction")),
    Case("nan-string-float", **bad(OK + "train: {lr: 'nan'}\n", expect="train.lr")),
    Case("huge-int-as-float", **bad(OK + "train: {lr: 1" + "0" * 400 + "}\n", expect="train.lr")),
    Case("set-nan-int", SET + ["fl.rounds=.nan"], "fl.rounds"),
    Case("set-inf-float", SET + ["train.lr=.inf"], "train.lr"),
    Case("set-nan-float-range", SET + ["train.momentum=.nan"], "train.momentum"),
    Case("set-nan-dp", SET + ["privacy.dp.noise_multiplier=.nan"], "privacy.dp.noise_multiplier"),
    Case("set-shared-memory-not-bool", SET + ["launch.shared_memory=auto"], "launch.shared_memory"),
    # -- files that are not YAML text, or too big, or that expand without end
    Case("binary-file", **bad(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", expect="bad.yaml")),
    Case("not-utf8", **bad(b"sites: [{name: caf\xe9}]\n", expect="bad.yaml")),
    Case("utf16", **bad("sites: [{name: a}]\n".encode("utf-16"), expect="bad.yaml")),
    Case("over-size-cap", files={"bad.yaml": _big}, argv=["validate", "{t}/bad.yaml"], expect="bad.yaml"),
    Case("alias-bomb", **bad(_bomb(), "validate", "{t}/bad.yaml", "--print", expect="bad.yaml")),
    Case("alias-bomb-launch", **bad(_bomb(), *LAUNCH[:1], "{t}/bad.yaml", *LAUNCH[2:], expect="bad.yaml")),
    Case("deep-lists", **bad(DEEP, expect="bad.yaml")),
    Case("deep-mappings", **bad(DEEP_MAP, expect="bad.yaml")),
    Case("recursive-alias", **bad("sites: [{name: a}]\nmodel: {args: {x: &x [*x]}}\n", expect="bad.yaml")),
    Case("complex-key", **bad("? [a, b]\n: 1\n", expect="bad.yaml")),
    Case("complex-key-nested", **bad(OK + "model:\n  args:\n    ? {a: 1}\n    : 2\n", expect="bad.yaml")),
    Case("bad-merge", **bad(OK + "train:\n  <<: 3\n", expect="bad.yaml")),
    Case("duplicate-key", **bad(OK + "fl: {rounds: 2}\nfl: {rounds: 3}\n", expect="bad.yaml")),
    Case("yaml-syntax", **bad("sites: [{name: a}\n", expect="bad.yaml")),
    Case("two-documents", **bad(OK + "---\n" + OK, expect="bad.yaml")),
    Case("missing-config", ["validate", "{t}/nope.yaml"], "nope.yaml"),
    Case("directory-config", ["validate", "{t}"], "{t}"),
    # -- keys, types, ranges
    Case("unknown-key", **bad(OK + "train: {lrate: 0.1}\n", expect="train.lrate")),
    Case("unknown-top-key", **bad(OK + "trian: {lr: 0.1}\n", expect="trian")),
    Case("set-unknown-key", SET + ["train.lrate=3"], "train.lrate"),
    Case("wrong-type-int", **bad(OK + "fl: {rounds: ten}\n", expect="fl.rounds")),
    Case("wrong-type-bool", **bad(OK + "fl: {rounds: true}\n", expect="fl.rounds")),
    Case("wrong-type-list", **bad(OK + "train: {lr: [1]}\n", expect="train.lr")),
    Case("wrong-type-sites", **bad("sites: 3\n", expect="sites")),
    Case("fractional-int", **bad(OK + "fl: {rounds: 2.5}\n", expect="fl.rounds")),
    Case("top-level-list", **bad("- a\n- b\n", expect="bad.yaml")),
    Case("empty-file", **bad("", expect="sites")),
    Case("bad-choice", **bad(OK + "fl: {strategy: fedavgg}\n", expect="fl.strategy")),
    Case("out-of-range-float", **bad(OK + "train: {momentum: 1.5}\n", expect="train.momentum")),
    Case("out-of-range-int", **bad(OK + "fl: {rounds: 0}\n", expect="fl.rounds")),
    Case("negative-batch", **bad(OK + "train: {batch_size: -1}\n", expect="train.batch_size")),
    Case("sites-count-huge", **bad("sites: {count: 1e12}\n", expect="sites.count")),
    Case("set-no-equals", SET + ["fl.rounds"], "fl.rounds"),
    Case("set-empty-key", SET + ["=3"], "--set"),
    Case("set-odd-index", SET + ["sites.\u00b2.name=x"], "sites.\u00b2"),
    Case("set-deep", SET + ["model.args=" + "[" * 2000 + "]" * 2000], "model.args"),
    Case("set-out-of-range", SET + ["train.momentum=2"], "train.momentum"),
    # -- the same config errors through the other commands that read a config
    Case("launch-nan", LAUNCH + ["fl.rounds=.nan"], "fl.rounds"),
    Case("launch-binary", **bad(b"\x00\x01\x02", "launch", "{t}/bad.yaml", "--dry-run", expect="bad.yaml")),
    Case("run-nan", ["run", DIGITS, "--set", "train.lr=.nan"], "train.lr"),
    Case("run-missing", ["run", "{t}/nope.yaml"], "nope.yaml"),
    Case("render-nan", ["render", CPU, "--set", "cluster.cores_per_socket=.nan"], "cluster.cores_per_socket"),
    Case("render-too-many-ranks", ["render", CPU, "--set", "sites.0.ranks=9"], "cluster"),
    Case("placement-nan", ["placement", CPU, "--set", "cluster.nodes=.inf"], "cluster.nodes"),
    Case("submit-nan", ["submit", CPU, "--set", "run.root={t}/runs", "--set", "cluster.aggregator_cores=.nan"],
         "cluster.aggregator_cores", files={"bin/sbatch": "#!/bin/sh\ntouch \"$0.called\"\n"}, env={"PATH": "{t}/bin"}),
    # -- command-line arguments, with the ranges of the config keys they mirror
    Case("synth-slides-1", ["synth-slides", "{t}/slides", "--slides", "1"], "--slides"),
    Case("synth-slides-0", ["synth-slides", "{t}/slides", "--slides", "0"], "--slides"),
    Case("synth-size-small", ["synth-slides", "{t}/slides", "--size", "100"], "--size"),
    Case("synth-size-negative", ["synth-slides", "{t}/slides", "--size", "-5"], "--size"),
    Case("synth-seed-negative", ["synth-slides", "{t}/slides", "--seed", "-1"], "--seed"),
    Case("synth-not-int", ["synth-slides", "{t}/slides", "--slides", "many"], "--slides"),
    Case("synth-out-is-file", ["synth-slides", "{t}/f.txt"], "f.txt", files={"f.txt": "x"}),
    Case("tile-size-0", ["tile", "{t}/slides", "--out", "{t}/index", "--tile-size", "0"], "--tile-size",
         files={"slides/a.tiff": b"II*\x00"}),
    Case("tile-size-negative", ["tile", "{t}/slides", "--out", "{t}/index", "--tile-size", "-256"], "--tile-size",
         files={"slides/a.tiff": b"II*\x00"}),
    Case("tile-stride-negative", ["tile", "{t}/slides", "--out", "{t}/index", "--stride", "-1"], "--stride",
         files={"slides/a.tiff": b"II*\x00"}),
    Case("tile-level-negative", ["tile", "{t}/slides", "--out", "{t}/index", "--level", "-1"], "--level",
         files={"slides/a.tiff": b"II*\x00"}),
    Case("tile-size-not-int", ["tile", "{t}/slides", "--out", "{t}/index", "--tile-size", "abc"], "--tile-size"),
    Case("tile-out-is-file", ["tile", "{t}/slides", "--out", "{t}/index"], "index",
         files={"slides/a.tiff": b"II*\x00", "index": "a file"}),
    Case("tile-empty-dir", ["tile", "{t}/slides", "--out", "{t}/index"], "slides", files={"slides/notes.txt": "x"}),
    Case("tile-missing-dir", ["tile", "{t}/nope", "--out", "{t}/index"], "nope"),
    Case("render-o-missing-dir", ["render", CPU, "-o", "{t}/nope/job.sbatch"], "nope"),
    Case("render-o-directory", ["render", CPU, "-o", "{t}/d"], "{t}/d", files={"d/keep": ""}),
    Case("render-bad-launcher", ["render", CPU, "--launcher", "pbs"], "--launcher"),
    Case("unknown-command", ["bogus"], "bogus"),
    # -- SLURM commands without SLURM, and their files
    Case("placement-missing-nodes-file", ["placement", CPU, "--nodes-file", "{t}/nodes", "--format", "rankfile"],
         "nodes"),
    Case("placement-nodes-file-is-dir", ["placement", CPU, "--nodes-file", "{t}/d", "--format", "hostfile"], "{t}/d",
         files={"d/keep": ""}),
    Case("placement-empty-nodes-file", ["placement", CPU, "--nodes-file", "{t}/nodes", "--format", "hostfile"], "nodes",
         files={"nodes": "\n"}),
    Case("placement-binary-nodes-file", ["placement", CPU, "--nodes-file", "{t}/nodes", "--format", "hosts"], "nodes",
         files={"nodes": b"\xff\xfe\x00"}),
    Case("placement-no-job", ["placement", CPU, "--format", "hostfile"], "--nodes-file",
         env={"SLURM_JOB_NODELIST": ""}),
    Case("placement-no-scontrol", ["placement", CPU, "--format", "hostfile"], "scontrol not found",
         env={**NO_SLURM, "SLURM_JOB_NODELIST": "node[1-2]"}),
    Case("submit-no-sbatch", ["submit", CPU, "--set", "run.root={t}/runs"], "sbatch not found", env=NO_SLURM),
    # -- run directories: locked, corrupt, another config
    Case("launch-locked", LAUNCH, "in use by pid", files={"runs/digits/run.lock": _locked}),
    Case("launch-all-checkpoints-corrupt", LAUNCH, "no valid checkpoint",
         files={"runs/digits/checkpoints": _checkpoints(corrupt=True)}),
    Case("launch-resume-nothing", LAUNCH + ["--set", "fl.rounds=2", "--resume"], "--resume"),
    Case("launch-restart-locked", LAUNCH + ["--set", "fl.rounds=2", "--restart"], "in use by pid",
         files={"runs/digits/run.lock": _locked}),
    # -- status / stop / cancel (hpcfl/cluster/slurm.py, cli._status_or_cancel)
    Case("status-empty-dir", ["status", "{t}/empty-run"], "empty-run", files={"empty-run/.keep": ""}),
    Case("status-corrupt-jobs", ["status", RUN_DIR], "jobs.json",
         files={"runs/digits/slurm/jobs.json": "[{\"job_id\": ", "runs/digits/config.yaml": OK}),
    Case("status-corrupt-config", ["status", RUN_DIR], "config.yaml",
         files={"runs/digits/config.yaml": b"\x00\xff: [\n", "runs/digits/metrics.jsonl": ""}),
    Case("status-corrupt-metrics", ["status", RUN_DIR], "metrics.jsonl",
         files={"runs/digits/config.yaml": OK, "runs/digits/metrics.jsonl": b"\x00\xff\xfe garbage\n\x89"}),
    Case("status-unknown-job", ["status", "987654"], "not found", env=NO_SLURM),
    Case("status-missing-dir", ["status", "{t}/nope"], "nope"),
    Case("stop-empty-dir", ["stop", "{t}/empty-run"], "empty-run", files={"empty-run/.keep": ""}),
    Case("stop-unknown-job", ["stop", "987654"], "not found", env=NO_SLURM),
    Case("stop-corrupt-jobs", ["stop", RUN_DIR], "digits",
         files={"runs/digits/slurm/jobs.json": b"\xff\x00"}),
    Case("cancel-empty-dir", ["cancel", "{t}/empty-run"], "empty-run", files={"empty-run/.keep": ""}),
    Case("cancel-no-scancel", ["cancel", "987654"], "not found", env=NO_SLURM),
    # -- report (hpcfl/observe)
    Case("features-missing-run", ["features", "{t}/nope", "--out", "{t}/feats"], "nope"),
    Case("features-not-a-run", ["features", "{t}/empty-run", "--out", "{t}/feats"], "empty-run",
         files={"empty-run/.keep": ""}),
    Case("report-missing-dir", ["report", "{t}/nope"], "nope"),
    Case("report-empty-dir", ["report", "{t}/empty-run"], "empty-run", files={"empty-run/.keep": ""}),
    Case("report-o-missing-dir", ["report", RUN_DIR, "-o", "{t}/nope/r.html"], "nope",
         files={"runs/digits/config.yaml": OK, "runs/digits/metrics.jsonl": ""}),
]

# Cases whose code was being changed by another author while this table was written; all have landed.
def _fill(s: str, t: Path) -> str:
    return s.replace("{t}", str(t))


def _write(t: Path, files: Dict[str, object]) -> None:
    (t / "empty").mkdir()
    for rel, content in files.items():
        p = t / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        if rel.startswith("bin/"):
            p.chmod(p.stat().st_mode | stat.S_IXUSR)


def _snapshot(t: Path) -> Dict[str, tuple]:
    return {str(p.relative_to(t)): (p.is_dir(), None if p.is_dir() else p.stat().st_size,
                                    None if p.is_dir() else p.stat().st_mtime_ns) for p in t.rglob("*")}


def _in_process(argv: List[str]) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def _check(case: Case, rc: int, out: str, err: str, before: Dict, after: Dict, t: Path) -> None:
    lines = err.strip().splitlines()
    assert rc not in (0, None), f"exit 0 on bad input; stdout: {out!r} stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert 1 <= len(lines) <= 2, f"{len(lines)} lines on stderr:\n{err}"
    assert _fill(case.expect, t) in err, f"{case.expect!r} not named in: {err!r}"
    assert after == before, f"written: {sorted(set(after) - set(before))} changed: " \
                            f"{sorted(k for k in before if k in after and after[k] != before[k])}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch):
    t = tmp_path / "w"
    t.mkdir()
    _write(t, case.files)
    monkeypatch.chdir(t)
    for k, v in case.env.items():
        monkeypatch.setenv(k, _fill(v, t))
    argv = [_fill(a, t) for a in case.argv]
    before = _snapshot(t)
    rc, out, err = _in_process(argv)
    _check(case, rc, out, err, before, _snapshot(t), t)


def test_there_are_enough_cases_and_every_command_is_covered():
    from hpcfl.cli import build_parser

    assert len(CASES) >= 60
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    covered = {c.argv[0] for c in CASES}
    assert set(sub.choices) <= covered, f"commands without a bad-input case: {set(sub.choices) - covered}"


@pytest.mark.parametrize("argv,expect,files", [
    (["validate", "bad.yaml"], "bad.yaml", {"bad.yaml": b"\x00\x01binary"}),
    (["validate", DIGITS, "--set", "fl.rounds=.nan"], "fl.rounds", {}),
    (["validate", "bad.yaml"], "bad.yaml", {"bad.yaml": _bomb()}),
    (["run", DIGITS, "--set", "train.momentum=.nan"], "train.momentum", {}),
    (["tile", "slides", "--out", "index"], "slides", {"slides/x.txt": ""}),
], ids=["binary", "nan", "alias-bomb", "run-nan", "tile-empty"])
def test_bad_input_through_the_real_command(argv, expect, files, tmp_path):
    _write(tmp_path, files)
    before = _snapshot(tmp_path)
    r = hpcfl(*argv, cwd=tmp_path, timeout=120)
    _check(Case("x", argv, expect), r.returncode, r.stdout, r.stderr, before, _snapshot(tmp_path), tmp_path)


def test_merge_keys_are_yaml_and_work(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("base: &base {name: a, ranks: 2}\n"
                 "sites:\n  - <<: *base\n  - {<<: *base, name: b, ranks: 1}\n"
                 "defaults: &train {lr: 0.5, batch_size: 8}\n"
                 "train: {<<: *train, lr: 0.25}\n".replace("defaults", "x-train").replace("base:", "x-base:"))
    rc, out, err = _in_process(["validate", str(p)])
    assert rc == 2 and "x-base: unknown key" in err  # merging works; the anchors' own keys are still checked
    p.write_text("sites:\n  - &a {name: a, ranks: 2}\n  - {<<: *a, name: b, ranks: 1}\n"
                 "train: {<<: {lr: 0.5, batch_size: 8}, lr: 0.25}\n")
    rc, out, err = _in_process(["validate", str(p), "--print"])
    assert rc == 0, err
    assert "site 'a' (2), site 'b' (1)" in out
    assert "lr: 0.25" in out and "batch_size: 8" in out


def test_help_lists_each_command_once():
    rc, out, err = _in_process(["--help"])
    assert rc == 0
    from hpcfl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert sum(line.split()[0] == name for line in out.splitlines() if line.strip()) == 1, (name, out)
