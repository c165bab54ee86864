#!/usr/bin/env python
"""Final global weights of configs, as fingerprints: the check that a refactor keeps training bit-identical.

Runs each config with ``hpcfl launch`` (from the source tree given by --code, so an older checkout can
produce the reference), then hashes the last checkpoint's model arrays by name (layout-independent):

    python scripts/weights_fingerprint.py --code /path/to/old/checkout configs/digits.yaml --set fl.rounds=3 > old.json
    python scripts/weights_fingerprint.py configs/digits.yaml --set fl.rounds=3 > new.json

tests/mpi/test_refactor_identity.py compares the digits configs against tests/golden/final-weights.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def fingerprint(model: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(model):
        a = np.ascontiguousarray(model[name], dtype=np.float32)
        h.update(name.encode() + b"\0" + str(a.shape).encode() + b"\0" + a.tobytes())
    return h.hexdigest()


def last_model(run_dir: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("round-*.npz"))
    if not ckpts:
        raise SystemExit(f"{run_dir}: no checkpoint")
    with np.load(ckpts[-1]) as z:
        return {k[6:]: z[k] for k in z.files if k.startswith("model/")}


def run(config: str, sets, code: Path, timeout: int = 900) -> dict:
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        argv = [sys.executable, "-m", "hpcfl", "launch", config, "--set", f"run.root={tmp}", "--set", "run.name=fp"]
        for s in sets:
            argv += ["--set", s]
        r = subprocess.run(argv, cwd=code, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise SystemExit(f"{config}: launch failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        model = last_model(Path(tmp) / "fp")
        return {"config": config, "set": list(sets), "sha256": fingerprint(model),
                "entries": len(model), "values": int(sum(v.size for v in model.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--code", default=str(ROOT), help="source tree to run (default: this checkout)")
    a = ap.parse_args()
    print(json.dumps(run(a.config, a.set, Path(a.code))))


if __name__ == "__main__":
    main()
