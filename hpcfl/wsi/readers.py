"""One reader interface, two backends: cuCIM (default) and OpenSlide.

Both are imported lazily, so a machine without one still works with the
other, and the error for a missing one says what to install. Readers are
opened inside each process (and each DataLoader worker): cuCIM's ``CuImage``
cannot be pickled, and a reader must never be shared across processes.
Inside a process, :func:`shared_reader` keeps one open reader per slide for
everyone (every simulated site, every dataset, the prefetch threads); a lock
per reader serialises its reads.

Every failure to open or read a slide raises :class:`SlideError` naming it.
"""
from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..errors import DependencyError, HpcflError

BACKENDS = ("cucim", "openslide")


class SlideError(HpcflError):
    """A slide is missing, unreadable, truncated, or has no tissue."""


class SlideReader(ABC):
    """An open slide. Coordinates (x, y) are always in level-0 pixels, as in OpenSlide and cuCIM."""

    backend = "base"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()

    @property
    @abstractmethod
    def level_count(self) -> int:
        """Number of pyramid levels."""

    @abstractmethod
    def level_dimensions(self, level: int) -> Tuple[int, int]:
        """(width, height) of a level."""

    @abstractmethod
    def level_downsample(self, level: int) -> float:
        """Downsample factor of a level relative to level 0."""

    @abstractmethod
    def _read(self, x: int, y: int, level: int, size: Tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) region whose top-left corner is (x, y) in level-0 pixels."""

    def read_region(self, x: int, y: int, level: int, size: Tuple[int, int]) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        try:
            return self._read(int(x), int(y), int(level), (int(size[0]), int(size[1])))
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this slide's problem
            raise SlideError(f"{self.path}: cannot read region ({x}, {y}) level {level} size {tuple(size)}: "
                             f"{type(exc).__name__}: {exc}") from None

    def read_regions(self, locations: Sequence[Tuple[int, int]], level: int, size: Tuple[int, int]) -> List[np.ndarray]:
        """Several regions of one size; backends that batch reads override this."""
        return [self.read_region(x, y, level, size) for x, y in locations]

    def read_batch(self, locations: Sequence[Tuple[int, int]], level: int, size: Tuple[int, int],
                   device: str = "cpu") -> Any:
        """Regions of one size as one (N, h, w, 3) uint8 array: NumPy, or CuPy when ``device`` is a GPU."""
        if device != "cpu":
            raise SlideError(f"{self.path}: the {self.backend} reader decodes on the CPU only "
                             "(data.tiles.decode_device: cuda needs data.tiles.backend: cucim)")
        return np.stack(self.read_regions(locations, level, size))

    def close(self) -> None:
        """Release the file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CuCIMReader(SlideReader):
    backend = "cucim"

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            from cucim import CuImage
        except ImportError as exc:
            raise DependencyError(f"cuCIM is not importable ({exc}); pip install cucim-cu12 "
                                  "(scripts/install.sh installs the CPU-capable part)") from None
        self._img = CuImage(str(path))
        res = self._img.resolutions
        self._dims = [tuple(int(v) for v in d) for d in res["level_dimensions"]]
        self._down = [float(d) for d in res["level_downsamples"]]

    @property
    def level_count(self) -> int:
        return len(self._dims)

    def level_dimensions(self, level: int) -> Tuple[int, int]:
        return self._dims[level]

    def level_downsample(self, level: int) -> float:
        return self._down[level]

    def _read(self, x, y, level, size):
        region = self._img.read_region((x, y), size, level)
        return np.asarray(region)[..., :3]

    def read_regions(self, locations, level, size):
        """cuCIM's multi-location read_region decodes a batch in one call (numpy 2 needs a list of tuples)."""
        if len(locations) < 2:
            return super().read_regions(locations, level, size)
        return list(self.read_batch(locations, level, size))

    def read_batch(self, locations, level, size, device="cpu", workers: int = 1):
        """One multi-location ``read_region`` call returning the whole batch.

        On ``device="cuda"`` cuCIM decodes the JPEG tiles of a multi-location read on
        the GPU (nvJPEG, in its default plugin), but a single-location read on the CPU
        (libjpeg-turbo), and the two decoders differ by a few levels. So that a tile's
        pixels never depend on how its batch was split, a one-location GPU batch is read
        as a two-location batch (the location twice) and the first copy kept: every GPU
        batch takes the nvJPEG path. ``workers``: cuCIM's reading threads. The result is
        copied out of cuCIM's reused buffer.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        locs = [(int(x), int(y)) for x, y in locations]
        wh = (int(size[0]), int(size[1]))
        xp = np if device == "cpu" else _cupy()
        try:
            if len(locs) == 1 and device == "cpu":  # (libjpeg-turbo either way on the CPU)
                out = self._img.read_region(locs[0], wh, level, device=device)
                return xp.array(xp.asarray(out)[None, ..., :3], order="C")  # always a copy
            many = locs if len(locs) > 1 else locs * 2  # one decode path for every GPU batch: see above
            batch = self._img.read_region(many, wh, level, num_workers=max(1, int(workers)), batch_size=len(many),
                                           device=device)
            got = xp.asarray(next(iter(batch)))[:len(locs), ..., :3]
            return xp.array(got, order="C")  # a copy: the loader reuses its buffer
        except Exception as exc:  # noqa: BLE001
            where = "" if device == "cpu" else f" on {device} (data.tiles.decode_device)"
            raise SlideError(f"{self.path}: batched read of {len(locs)} regions{where} failed: "
                             f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self._img = None


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            import openslide
        except ImportError as exc:
            raise DependencyError(f"OpenSlide is not importable ({exc}); pip install openslide-python openslide-bin") from None
        self._slide = openslide.OpenSlide(str(path))

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    def level_dimensions(self, level: int) -> Tuple[int, int]:
        return tuple(self._slide.level_dimensions[level])

    def level_downsample(self, level: int) -> float:
        return float(self._slide.level_downsamples[level])

    def _read(self, x, y, level, size):
        return np.asarray(self._slide.read_region((x, y), level, size).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


def open_slide(path, backend: str = "cucim") -> SlideReader:
    """Open a slide with a backend; missing, empty or unreadable files raise SlideError naming the file."""
    p = Path(path)
    if backend not in BACKENDS:
        raise SlideError(f"{p}: unknown reader backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if not p.exists():
        raise SlideError(f"{p}: slide not found")
    if p.is_dir() or os.path.getsize(p) == 0:
        raise SlideError(f"{p}: not a slide file (empty or a directory)")
    cls = CuCIMReader if backend == "cucim" else OpenSlideReader
    from ..cquiet import c_stderr, said

    printed: List[str] = []
    try:
        with c_stderr(f"{p}: opening with {backend}") as printed:  # libtiff's own complaint goes into our line
            reader = cls(p)
    except DependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - cuCIM and OpenSlide raise many types for a bad file
        raise SlideError(f"{p}: cannot open slide with {backend}: {type(exc).__name__}: {exc}{said(printed)}") from None
    if reader.level_count < 1:
        raise SlideError(f"{p}: slide has no image levels")
    return reader


def _cupy():
    import cupy

    return cupy


_POOL: Dict[Tuple[str, str], SlideReader] = {}
_POOL_LOCK = threading.Lock()


def _forget_readers() -> None:
    """In a forked child (a DataLoader worker): the parent's open files and locks are not ours."""
    global _POOL_LOCK
    _POOL.clear()
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_readers)


def shared_reader(path, backend: str = "cucim") -> SlideReader:
    """The process's one open reader of a slide (opened on first use). Take ``reader.lock`` to read."""
    key = (str(path), backend)
    with _POOL_LOCK:
        r = _POOL.get(key)
        if r is None:
            r = _POOL[key] = open_slide(path, backend)
        return r


def warm_up_cucim(path) -> None:
    """Open a slide and read one pixel with cuCIM, before Horovod is loaded.

    cuCIM is built with the old C++ string ABI; Horovod's library is loaded
    with RTLD_GLOBAL and carries new-ABI instances of the same ``std::regex``
    templates. cuCIM resolves its calls lazily, at first use: if that happens
    after Horovod is loaded, they bind to Horovod's instances and the process
    crashes (seen: SIGSEGV in cucim::io::Device). Binding them first is enough.
    """
    with open_slide(path, "cucim") as r:
        r.read_region(0, 0, r.level_count - 1, (1, 1))
