#!/usr/bin/env python
"""Final global weights of configs: fingerprints, the environment that made them, and their distance.

Runs each config with ``hpcfl launch`` (from the source tree given by --code, so an older checkout can
produce the reference), then hashes the last checkpoint's model arrays by name (layout-independent):

    python scripts/weights_fingerprint.py --code /path/to/old/checkout configs/digits.yaml --set fl.rounds=3 > old.json
    python scripts/weights_fingerprint.py configs/digits.yaml --set fl.rounds=3 > new.json
    python scripts/weights_fingerprint.py --capability default --save w.npz configs/digits.yaml --set fl.rounds=3

Float results are bit-identical on one machine and one set of CPU kernels, not across them: the same code
gives other last bits with AVX512 kernels than with AVX2 ones (``ATEN_CPU_CAPABILITY`` forces a set). So a
golden result records the environment that made it (:func:`environment`); where the environment matches,
bits are compared, elsewhere the weights themselves within a measured tolerance (:func:`compare`).
tests/mpi/test_refactor_identity.py checks tests/golden/final-weights.json this way, and
scripts/golden_spread.py measures the tolerance.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# What decides the floating-point path of a CPU run: equal keys give equal bits (measured, see golden_spread.py).
ENV_KEYS = ("torch", "capability", "blas", "onednn", "cpu")

_ENV_PROBE = r"""
import json, platform, torch
cfg = torch.__config__.show().splitlines()
def line(*words):
    return next((l.strip(" -") for l in cfg if any(w in l for w in words)), "")
cpu = ""
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    cpu = platform.processor()
print(json.dumps({"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
                  "blas": line("Math Kernel Library", "OpenBLAS", "BLAS_INFO"), "onednn": line("MKL-DNN", "oneDNN"),
                  "cpu": cpu}))
"""


def capability_env(capability: Optional[str]) -> Dict[str, str]:
    """The process environment with ``ATEN_CPU_CAPABILITY`` forced (None: the machine's own kernels)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def environment(capability: Optional[str] = None, python: str = sys.executable) -> Dict[str, str]:
    """The floating-point environment a run gets under ``capability`` (asked of a fresh interpreter, since
    torch reads ATEN_CPU_CAPABILITY once, at import)."""
    r = subprocess.run([python, "-c", _ENV_PROBE], capture_output=True, text=True, env=capability_env(capability),
                       timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"could not read the torch environment: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def fingerprint(model: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(model):
        a = np.ascontiguousarray(model[name], dtype=np.float32)
        h.update(name.encode() + b"\0" + str(a.shape).encode() + b"\0" + a.tobytes())
    return h.hexdigest()


def distance(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]) -> float:
    """Relative L2 distance of two models, ||got - ref|| / ||ref|| over every value (float64)."""
    if sorted(got) != sorted(ref):
        return float("inf")
    num = den = 0.0
    for k in ref:
        a, b = np.asarray(got[k], np.float64), np.asarray(ref[k], np.float64)
        if a.shape != b.shape:
            return float("inf")
        num += float(np.sum((a - b) ** 2))
        den += float(np.sum(b ** 2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def same_env(a: Dict[str, str], b: Dict[str, str]) -> bool:
    return all(a.get(k) == b.get(k) for k in ENV_KEYS)


def env_diff(a: Dict[str, str], b: Dict[str, str]) -> str:
    return ", ".join(f"{k} {a.get(k)!r} here vs {b.get(k)!r}" for k in ENV_KEYS if a.get(k) != b.get(k))


def compare(case: dict, got: Dict[str, np.ndarray], env: Dict[str, str], ref: Dict[str, np.ndarray],
            tolerance: float, tolerance_path: bool = False) -> Tuple[bool, str]:
    """Checks a run's final weights against a golden case; returns (passed, what was compared and why).

    Bits where one of the case's recorded environments matches this one; otherwise the weights themselves
    within ``tolerance`` (relative L2) of the stored reference weights ``ref``. ``tolerance_path`` takes the
    tolerance comparison whatever the environment (and the bits too where it matches), so that the path a
    machine of another CPU takes is exercised on this one."""
    name = " ".join([case["config"], *case["set"]])
    match = next((rec for rec in case["bits"] if same_env(env, rec["env"])), None)
    d = distance(got, ref)
    if tolerance_path or match is None:
        why = ("forced" if match is not None else
               env_diff(env, case["bits"][0]["env"]) if case["bits"] else "no recorded environment")
        if d > tolerance:
            return False, _tolerance_failure(name, d, tolerance, why, env, case)
        if match is None:
            return True, f"{name}: within tolerance ({d:.3g} <= {tolerance:g}; environment: {why})"
    sha = fingerprint(got)
    if sha == match["sha256"]:
        return True, f"{name}: bit-identical to the golden made in this environment ({env['capability']})"
    return False, (f"{name}: BIT comparison failed: this environment ({env['capability']}, torch {env['torch']}, "
                   f"{env['cpu']}) is the one golden sha256 {match['sha256'][:12]}... was made in, and the weights "
                   f"differ ({sha[:12]}...; relative L2 {d:.3g} from the reference weights, tolerance across CPUs "
                   f"{tolerance:g}): the trajectory changed")


def _tolerance_failure(name: str, d: float, tolerance: float, why: str, env: Dict[str, str], case: dict) -> str:
    made = case["bits"][0]["env"].get("torch") if case["bits"] else None
    note = (f" NOTE: torch differs ({env['torch']} here, {made} for the goldens): a torch upgrade can change results "
            "by more than CPU kernels do; if that is the cause, regenerate the goldens (scripts/golden_spread.py)"
            if made is not None and env.get("torch") != made else "")
    return (f"{name}: TOLERANCE comparison failed ({why}): the weights are {d:.3g} (relative L2) from the stored "
            f"reference, more than the tolerance {tolerance:g} that the spread between CPU kernel sets allows "
            f"(scripts/golden_spread.py): the trajectory changed.{note}")


def last_model(run_dir: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("round-*.npz"))
    if not ckpts:
        raise SystemExit(f"{run_dir}: no checkpoint")
    with np.load(ckpts[-1]) as z:
        return {k[6:]: z[k] for k in z.files if k.startswith("model/")}


def run_model(config: str, sets: List[str], code: Path = ROOT, capability: Optional[str] = None,
              timeout: int = 900) -> Dict[str, np.ndarray]:
    """The final global weights of ``hpcfl launch config --set ...`` run from the tree ``code``."""
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        argv = [sys.executable, "-m", "hpcfl", "launch", config, "--set", f"run.root={tmp}", "--set", "run.name=fp"]
        for s in sets:
            argv += ["--set", s]
        r = subprocess.run(argv, cwd=code, capture_output=True, text=True, timeout=timeout,
                           env=capability_env(capability))
        if r.returncode != 0:
            raise SystemExit(f"{config}: launch failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return last_model(Path(tmp) / "fp")


def run(config: str, sets, code: Path = ROOT, timeout: int = 900, capability: Optional[str] = None) -> dict:
    model = run_model(config, list(sets), code, capability, timeout)
    return {"config": config, "set": list(sets), "sha256": fingerprint(model),
            "entries": len(model), "values": int(sum(v.size for v in model.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--code", default=str(ROOT), help="source tree to run (default: this checkout)")
    ap.add_argument("--capability", default=None, help="force ATEN_CPU_CAPABILITY (default, avx2, avx512)")
    ap.add_argument("--save", default=None, help="also write the final weights to this .npz")
    a = ap.parse_args()
    model = run_model(a.config, a.set, Path(a.code), a.capability)
    if a.save:
        np.savez(a.save, **model)
    print(json.dumps({"config": a.config, "set": a.set, "sha256": fingerprint(model), "env": environment(a.capability),
                      "entries": len(model), "values": int(sum(v.size for v in model.values()))}))


if __name__ == "__main__":
    main()
