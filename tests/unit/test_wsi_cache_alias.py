"""The default tile cache never serves one slide's tile for another's.

cuCIM 26.10's per_process cache compares cache keys by tile position only (rapidsai/cucim#1108,
open): two slides read at the same position can get each other's pixels (seen here: 1 read in 512
across 8 slides). hpcfl's default is the shared_memory cache, whose keys include the file; this reads
the same positions of many slides in one process, through hpcfl's shared readers and the default
cache, and compares every tile with a decode that has no cache at all (OpenSlide).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from hpcfl.config import CacheConfig

PROBE = r"""
import json, sys
import numpy as np
from pathlib import Path
from hpcfl.wsi.cache import configure_cache
configure_cache(sys.argv[2], 64, Path(sys.argv[1]))
from hpcfl.wsi.readers import shared_reader, open_slide
paths = sorted(Path(sys.argv[1]).glob("s-*.tiff"))
readers = [shared_reader(p, "cucim") for p in paths]
truth = [open_slide(p, "openslide") for p in paths]
wrong = total = 0
for rep in range(2):                      # the second pass is served from the cache
    for y in range(0, 1024, 128):
        for x in range(0, 1024, 128):
            for r, t in zip(readers, truth):
                total += 1
                wrong += int(not np.array_equal(r.read_region(x, y, 0, (128, 128)), t.read_region(x, y, 0, (128, 128))))
print(json.dumps({"wrong": wrong, "total": total}))
"""


def test_the_default_cache_is_the_one_that_keys_tiles_by_file():
    assert CacheConfig().type == "shared_memory"


@pytest.mark.parametrize("kind", ["shared_memory", "nocache"])
def test_many_slides_at_the_same_positions_read_their_own_pixels(tmp_path, kind):
    from hpcfl.wsi.minitiff import texture, write_jpeg_tiff

    for i in range(8):
        write_jpeg_tiff(tmp_path / f"s-{i}.tiff", texture(1024, seed=i), tile=256)
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), kind], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["total"] == 2 * 64 * 8 and got["wrong"] == 0, got
