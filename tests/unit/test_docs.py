from pathlib import Path

from hpcfl.config import reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_current():
    assert reference_markdown() in (ROOT / "README.md").read_text(), \
        "README's config reference is stale: run scripts/config_reference.py"


def test_readme_shows_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
