#!/usr/bin/env python
"""Rewrite README.md's config reference (between its markers) from hpcfl.config."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpcfl.config import reference_markdown  # noqa: E402

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
new = f"{start}\n{reference_markdown()}\n{end}"
text, n = re.subn(re.escape(start) + r".*?" + re.escape(end), lambda m: new, text, flags=re.S)
if n != 1:
    sys.exit("README.md: config reference markers not found")
readme.write_text(text)
