"""Where tile batches are decoded and assembled, and a thread that keeps them coming.

``data.tiles.decode_device`` says where cuCIM decodes (cpu, or cuda: nvJPEG);
``data.array_backend`` where batches are assembled (``auto`` follows the
decode device; ``cupy`` assembles on the GPU even from CPU-decoded tiles).
Batches assembled on the host go to pinned memory when CUDA is present, so the
trainer's ``.to(device, non_blocking=True)`` really overlaps; batches assembled
on the GPU reach torch through DLPack, without a host copy.

:func:`plan_feed` is pure (what is available is passed in), so every choice and
every refusal is tested on machines without a GPU; :func:`feed_plan` asks the
machine. Refusals are one line naming the config key, raised when the site
starts, not deep inside a loader.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from ..errors import ConfigError, DependencyError

T = TypeVar("T")


@dataclass(frozen=True)
class FeedPlan:
    decode: str = "cpu"  # where tiles are decoded: "cpu" or "cuda"
    xp: str = "numpy"  # where batches are assembled: "numpy" (host) or "cupy" (GPU)
    pin: bool = False  # host batches in pinned memory (CUDA present)
    device: int = -1  # the rank's CUDA device (-1: none)

    @property
    def on_gpu(self) -> bool:
        """Batches leave the feed on the GPU."""
        return self.xp == "cupy"

    @property
    def cuda_device(self) -> str:
        """cuCIM's device string for decoding."""
        return "cpu" if self.decode == "cpu" else ("cuda" if self.device <= 0 else f"cuda:{self.device}")


def plan_feed(decode_device: str, array_backend: str, reader_backend: str, loader_workers: int,
              cuda_available: bool, device: int = 0, cupy_error: Optional[str] = None,
              train_device: str = "auto") -> FeedPlan:
    """Decide decode device, assembly module and pinning; refuse impossible combinations in one line.

    ``cupy_error``: why CuPy is not usable here (None when it is). ``train_device``: the
    ``train.device`` setting (``cpu`` trains on the host: batches stay there, unpinned).
    """
    if decode_device not in ("cpu", "cuda"):
        raise ConfigError(f"data.tiles.decode_device: {decode_device!r} is not one of cpu, cuda")
    if array_backend not in ("auto", "numpy", "cupy"):
        raise ConfigError(f"data.array_backend: {array_backend!r} is not one of auto, numpy, cupy")
    gpu_math = decode_device == "cuda" or array_backend == "cupy"
    if gpu_math and train_device == "cpu":
        key = "data.tiles.decode_device: cuda" if decode_device == "cuda" else "data.array_backend: cupy"
        raise ConfigError(f"{key} puts batches on the GPU, but train.device: cpu trains on the host; "
                          "use decode_device: cpu and array_backend: numpy (or auto)")
    if decode_device == "cuda":
        if not cuda_available:
            raise ConfigError("data.tiles.decode_device: cuda, but torch sees no usable CUDA device on this "
                              "machine; use decode_device: cpu (the default)")
        if reader_backend != "cucim":
            raise ConfigError(f"data.tiles.decode_device: cuda needs data.tiles.backend: cucim "
                              f"({reader_backend} decodes on the CPU only)")
        if array_backend == "numpy":
            raise ConfigError("data.array_backend: numpy assembles batches on the host, but data.tiles.decode_device: "
                              "cuda decodes on the GPU; use array_backend auto or cupy, or decode_device cpu")
    if gpu_math:
        key = "data.tiles.decode_device: cuda" if decode_device == "cuda" else "data.array_backend: cupy"
        if not cuda_available:
            raise ConfigError(f"{key}: no usable CUDA device on this machine; use numpy/cpu")
        if cupy_error is not None:
            raise DependencyError(f"{key} assembles batches with CuPy, which is not usable here ({cupy_error}); "
                                  "install the CuPy wheel for this CUDA (cupy-cuda12x or cupy-cuda13x)")
        if loader_workers > 0:
            raise ConfigError(f"{key} runs CUDA in the rank's process, and forked DataLoader workers cannot use "
                              "CUDA; set data.tiles.loader_workers: 0 (a prefetch thread keeps the GPU fed)")
        return FeedPlan(decode=decode_device, xp="cupy", pin=False, device=device)
    cuda_training = cuda_available and train_device != "cpu"
    return FeedPlan(decode="cpu", xp="numpy", pin=cuda_training, device=device if cuda_training else -1)


def cupy_problem() -> Optional[str]:
    """Why CuPy cannot assemble batches here, or None: it imports without a GPU and fails at the first op."""
    try:
        import cupy

        cupy.zeros(1).sum()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable CuPy
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def feed_plan(cfg) -> FeedPlan:
    """:func:`plan_feed` for this machine and a config (asks CUDA and CuPy only when needed). The GPU is
    the rank's current CUDA device: select it (torch.cuda.set_device) before building the site's data."""
    import torch

    t = cfg.data.tiles
    cuda = bool(torch.cuda.is_available())
    wants_gpu = t.decode_device == "cuda" or cfg.data.array_backend == "cupy"
    return plan_feed(t.decode_device, cfg.data.array_backend, t.backend, t.loader_workers, cuda,
                     torch.cuda.current_device() if cuda else -1, cupy_problem() if wants_gpu and cuda else None,
                     str(getattr(cfg.train, "device", "auto")))


def check_gpu_decode(path, plan: FeedPlan) -> None:
    """Decode two regions of a slide on the GPU now, so that a broken setup fails at site start in one line."""
    from .readers import SlideError, shared_reader

    if plan.decode != "cuda":
        return
    r = shared_reader(path, "cucim")
    level = r.level_count - 1
    try:
        with r.lock:
            r.read_batch([(0, 0), (0, 0)], level, (8, 8), plan.cuda_device)
    except SlideError as exc:
        raise DependencyError(f"data.tiles.decode_device: cuda: cuCIM cannot decode on the GPU here: {exc}") from None


def prefetched(source: Iterable[T], depth: int, setup: Optional[Callable[[], None]] = None) -> Iterator[T]:
    """Iterate ``source`` in a background thread, up to ``depth`` items ahead of the consumer.

    The thread decodes and assembles the next batches while the training step runs
    (cuCIM, NumPy and torch release the GIL in their heavy parts). An exception in the
    thread is raised here, at the item it replaced; closing this generator (the trainer
    stops after its planned steps) stops the thread and waits for it. ``setup`` runs
    first in the thread (selecting the rank's GPU: CuPy's current device is per thread).
    """
    if depth <= 0:
        yield from source
        return
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        it = iter(source)
        try:
            if setup is not None:
                setup()
            for item in it:
                if not put((0, item)):
                    return
            put((1, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((2, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="hpcfl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == 0:
                yield value
            elif kind == 1:
                return
            else:
                raise value
    finally:
        stop.set()
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join()
