"""pytest imports test modules by basename (rootdir-relative, no packages): two test files of one name in
two tiers stop the whole suite at collection, though each tier passes alone (it ended CI once, and two
branches of one session made the same mistake again)."""
from collections import Counter

from conftest import ROOT


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], {n: k for n, k in names.items() if k > 1}
