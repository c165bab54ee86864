#!/usr/bin/env python
"""Measures the tolerance of tests/golden/final-weights.json: how far the same code's final weights move
between CPU kernel sets (the spread a test must allow on another machine), next to how far a real change of
trajectory moves them (one round more, a 1% or 10% other learning rate, another seed; what a test must catch).

For every golden case it runs the config under ATEN_CPU_CAPABILITY=avx2 (the kernels the goldens were first
made with: the result must reproduce the recorded sha256 bit for bit), under the machine's own kernels and
under ``default`` (scalar), and the changed trajectories; it prints each one's relative L2 distance from the
avx2 weights. With --write it stores those weights (tests/golden/weights/) and the sha256 of every kernel set
run here, with its environment, in the golden file; --old-code runs the kernel sets from another checkout
too (the code before the refactor: it must give the same bits as this tree in each environment).

    python scripts/golden_spread.py [--write] [--old-code /path/to/checkout-at-5ab37c6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weights_fingerprint import ROOT, distance, environment, fingerprint, run_model  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "final-weights.json"


def changed(case: dict) -> dict:
    """The case's config with its trajectory changed on purpose, by name."""
    sys.path.insert(0, str(ROOT))
    from hpcfl.config import load_config

    cfg = load_config(ROOT / case["config"], case["set"])
    sets = list(case["set"])
    rounds = [s for s in sets if s.startswith("fl.rounds=")]
    more = [s for s in sets if s not in rounds] + [f"fl.rounds={cfg.fl.rounds + 1}"]
    return {"one round more": more,
            "lr x1.01": sets + [f"train.lr={cfg.train.lr * 1.01!r}"],
            "lr x1.1": sets + [f"train.lr={cfg.train.lr * 1.1!r}"],
            "another seed": sets + [f"run.seed={cfg.run.seed + 1}"]}


def slug(case: dict) -> str:
    words = [Path(case["config"]).stem, *case["set"]]
    return "".join(c if c.isalnum() or c in "-=." else "_" for c in "_".join(words))[:120]


def measure(case: dict, old_code: Path | None, changes: bool = True) -> dict:
    ref = run_model(case["config"], case["set"], capability="avx2")
    out = {"case": " ".join([case["config"], *case["set"]]), "ref": ref, "bits": [], "spread": {}, "changes": {}}
    for cap in ("avx2", None, "default"):
        model = ref if cap == "avx2" else run_model(case["config"], case["set"], capability=cap)
        env, sha = environment(cap), fingerprint(model)
        if old_code is not None:
            old = fingerprint(run_model(case["config"], case["set"], code=old_code, capability=cap))
            assert old == sha, f"{out['case']} under {env['capability']}: the old code gives {old}, this tree {sha}"
        if all(b["env"] != env for b in out["bits"]):
            out["bits"].append({"env": env, "sha256": sha})
        out["spread"][env["capability"]] = distance(model, ref)
    want = case.get("sha256") or next((b["sha256"] for b in case.get("bits", []) if b["env"]["capability"] == "AVX2"),
                                      None)
    assert want is None or fingerprint(ref) == want, f"{out['case']}: avx2 kernels no longer give the golden bits"
    for what, sets in (changed(case).items() if changes else ()):
        out["changes"][what] = distance(run_model(case["config"], sets), ref)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the weights and environments in the golden file")
    ap.add_argument("--old-code", type=Path, default=None, help="a checkout of the code the goldens came from")
    ap.add_argument("--json", type=Path, default=None, help="write the measured distances here")
    ap.add_argument("--only", type=int, nargs="+", default=None, help="measure these cases (their indices)")
    ap.add_argument("--no-changes", action="store_true", help="kernel sets only, no changed trajectories")
    a = ap.parse_args()
    golden = json.loads(GOLDEN.read_text())
    cases = golden["runs"] if a.only is None else [golden["runs"][i] for i in a.only]
    rows = []
    for case in cases:
        m = measure(case, a.old_code, changes=not a.no_changes)
        rows.append(m)
        print(f"{m['case']}\n  kernel sets: " + ", ".join(f"{k} {v:.2e}" for k, v in m["spread"].items())
              + "\n  changes:     " + ", ".join(f"{k} {v:.2e}" for k, v in m["changes"].items()), flush=True)
        if a.write:
            rel = Path("weights") / f"{slug(case)}.npz"
            (GOLDEN.parent / rel).parent.mkdir(exist_ok=True)
            np.savez_compressed(GOLDEN.parent / rel, **m["ref"])
            case.pop("sha256", None)
            case.update(weights=str(rel), bits=m["bits"])
            GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")  # case by case: a long run keeps what it did
    spread = max(v for m in rows for v in m["spread"].values())
    change = min((v for m in rows for v in m["changes"].values()), default=float("nan"))
    print(f"largest spread between kernel sets: {spread:.2e}; smallest change of trajectory: {change:.2e}; "
          f"ratio {change / max(spread, 1e-300):.0f}x")
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in m.items() if k != "ref"} for m in rows], indent=1))


if __name__ == "__main__":
    main()
