"""C libraries do not write to the user's terminal: probing a text file named .tiff, or a header-only TIFF,
printed libtiff's own line ("Not a TIFF or MDI file, bad magic number ...") before hpcfl's."""
import os

import pytest

from conftest import hpcfl
from hpcfl.cquiet import c_stderr


def test_what_a_c_call_writes_on_fd_2_is_caught(capfd):
    with c_stderr("a C call") as got:
        os.write(2, b"TIFFClientOpen: bad magic number\n\n")
    assert got == ["TIFFClientOpen: bad magic number"]
    assert capfd.readouterr().err == ""
    os.write(2, b"after\n")  # fd 2 is back
    assert capfd.readouterr().err == "after\n"
    with pytest.raises(ValueError):
        with c_stderr("a failing call") as got:
            os.write(2, b"said something\n")
            raise ValueError("x")
    assert got == ["said something"] and capfd.readouterr().err == ""


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
@pytest.mark.parametrize("content,said", [(b"hello world, some text\n", "bad magic number"),
                                          (b"II*\x00", "Cannot read TIFF header")])
def test_a_bad_tiff_gives_one_hpcfl_line_and_nothing_else(tmp_path, backend, content, said):
    pytest.importorskip("cucim" if backend == "cucim" else "openslide")
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.tiff").write_bytes(content)
    r = hpcfl("tile", tmp_path / "slides", "--out", tmp_path / "index", "--backend", backend)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("tiling:")]  # the progress line
    assert len(lines) == 1 and lines[0].startswith(f"hpcfl: {tmp_path / 'slides' / 'a.tiff'}: cannot open slide with "
                                                   f"{backend}"), r.stderr
    if backend == "cucim":  # cuCIM's own libtiff complains; its words are in hpcfl's line now
        assert said in lines[0], lines[0]
