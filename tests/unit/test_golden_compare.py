"""How a golden result is compared: bits in the environment that made it, the weights within a tolerance
elsewhere, and a failure message that says which comparison failed and why (hand-made weights)."""
import sys

import numpy as np
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from weights_fingerprint import compare, distance, fingerprint  # noqa: E402

AVX2 = {"torch": "2.13.0+cpu", "capability": "AVX2", "blas": "MKL 2024.2", "onednn": "v3.12.0", "cpu": "AMD EPYC"}
AVX512 = dict(AVX2, capability="AVX512")
REF = {"w": np.array([[3.0, 0.0], [0.0, 4.0]], np.float32), "b": np.zeros(2, np.float32)}  # ||REF|| = 5
CASE = {"config": "configs/digits.yaml", "set": ["fl.rounds=4"], "bits": [{"env": AVX2, "sha256": fingerprint(REF)}]}


def nudged(eps):
    return {"w": REF["w"] + np.float32(eps) * np.eye(2, dtype=np.float32) / np.sqrt(2), "b": REF["b"]}


def test_distance_is_relative_l2_over_every_array():
    assert distance(REF, REF) == 0.0
    assert np.isclose(distance(nudged(0.5), REF), 0.5 / 5.0)  # ||diff|| = 0.5
    assert distance({"w": REF["w"]}, REF) == float("inf")  # a missing array is no match
    assert distance({"w": REF["w"][:1], "b": REF["b"]}, REF) == float("inf")  # nor another shape


def test_bits_where_the_environment_matches():
    ok, why = compare(CASE, REF, AVX2, REF, 1e-3)
    assert ok and "bit-identical" in why
    ok, why = compare(CASE, nudged(1e-6), AVX2, REF, 1e-3)  # inside the tolerance, yet the bits differ
    assert not ok and why.startswith("configs/digits.yaml fl.rounds=4: BIT comparison failed") and "AVX2" in why


def test_tolerance_elsewhere():
    ok, why = compare(CASE, nudged(5e-4 * 5), AVX512, REF, 1e-3)
    assert ok and "within tolerance" in why and "capability 'AVX512' here vs 'AVX2'" in why
    ok, why = compare(CASE, nudged(2e-3 * 5), AVX512, REF, 1e-3)
    assert not ok and "TOLERANCE comparison failed" in why and "0.002 (relative L2)" in why
    assert "torch differs" not in why


def test_forced_tolerance_path_checks_both_where_the_environment_matches():
    ok, why = compare(CASE, REF, AVX2, REF, 1e-3, tolerance_path=True)
    assert ok and "bit-identical" in why
    ok, why = compare(CASE, nudged(1e-6), AVX2, REF, 1e-3, tolerance_path=True)
    assert not ok and "BIT comparison failed" in why
    ok, why = compare(CASE, nudged(1.0), AVX2, REF, 1e-3, tolerance_path=True)
    assert not ok and "TOLERANCE comparison failed (forced)" in why


def test_another_torch_is_named_as_the_likely_cause():
    ok, why = compare(CASE, nudged(1.0), dict(AVX2, torch="2.14.0+cpu"), REF, 1e-3)
    assert not ok and "torch differs (2.14.0+cpu here, 2.13.0+cpu for the goldens)" in why
