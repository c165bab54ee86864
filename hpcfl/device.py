"""Where a site rank computes, and how model-sized buffers cross between its device and MPI.

* :func:`select_device`: ``train.device`` (auto | cpu | cuda) -> a torch device; ``auto``
  is the rank's pinned GPU when CUDA is available (the launcher or the rank's own
  pinning sets CUDA_VISIBLE_DEVICES to one GPU, or to the GPUs ranks share).
* :class:`Stager`: moves a flat device tensor to and from MPI chunk by chunk. On
  the CPU it hands MPI the tensor's own memory. On a GPU it either hands MPI device
  memory directly (CUDA-aware MPI, detected; the current stream is synchronized
  before MPI touches it), or stages through two pinned host buffers, double-buffered:
  the device-host copy of chunk i+1 runs while MPI moves chunk i, on a side stream
  that first waits for the current stream.

Rank 0 never imports this module's torch parts: it stays on host memory.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from .errors import ConfigError


def select_device(want: str, local_index: int = 0) -> Any:
    """The torch device of ``train.device`` for a rank (``local_index``: its index among the site ranks of
    its node, which picks a GPU round-robin when several are visible)."""
    import torch

    if want == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if want == "cuda" and not available:
        raise ConfigError("train.device: cuda, but torch sees no GPU here "
                          f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          "use train.device: auto or cpu")
    if want not in ("auto", "cuda"):
        raise ConfigError(f"train.device: {want!r} is not auto, cpu or cuda")
    if not available:
        return torch.device("cpu")
    index = local_index % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def gpu_identity(device: Any) -> Optional[str]:
    """The identity of the GPU a rank trains on, unique across nodes (its UUID), or None on the CPU.

    Ranks exchange these to tell which of them share a GPU (:mod:`hpcfl.site.layout`): a device
    index says nothing about that (every rank pinned to one GPU sees it as cuda:0)."""
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    p = torch.cuda.get_device_properties(device)
    uuid = getattr(p, "uuid", None)
    if uuid:
        return f"GPU-{uuid}"
    import socket  # torch without the UUID property: the host and the PCI address name the GPU

    return (f"{socket.gethostname()}:pci-{getattr(p, 'pci_domain_id', 0):04x}:{getattr(p, 'pci_bus_id', 0):02x}:"
            f"{getattr(p, 'pci_device_id', 0):02x}")


def device_info(device: Any) -> Dict[str, Any]:
    """What manifest.json records about the device a rank really used."""
    import torch

    if device.type != "cuda":
        return {"type": "cpu", "torch_threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(device)  # pragma: no cover - needs a GPU
    return {  # pragma: no cover
        "type": "cuda", "index": device.index, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 2),
        "compute_capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "nccl": _nccl_version(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "uuid": gpu_identity(device),
    }


def _nccl_version() -> Optional[str]:  # pragma: no cover - needs a GPU build
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - informational
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def cuda_aware_mpi() -> Optional[bool]:
    """Whether the MPI library can read and write GPU memory (MPIX_Query_cuda_support); None if unknown."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    query = getattr(MPI, "Query_cuda_support", None)
    if query is None:
        return None
    try:
        return bool(query())
    except Exception:  # noqa: BLE001 - an MPI without the extension
        return None


def chunks(n: int, itemsize: int, chunk_mb: int) -> Iterator[Tuple[int, int]]:
    step = max(1, (chunk_mb << 20) // itemsize)
    for s in range(0, n, step):
        yield s, min(n, s + step)


class Stager:
    """Moves a flat device tensor ``dev`` through MPI in chunks of ``chunk_mb``.

    ``receive(dev, recv_chunk)``: ``recv_chunk(host_view)`` fills a host buffer (e.g. an
    MPI Bcast of that chunk), which is copied into ``dev``. ``send(dev, send_chunk)``: each
    chunk of ``dev`` is copied to a host buffer and handed to ``send_chunk`` (e.g. a Reduce).
    On a CPU device the host views ARE the tensor's memory: no copies at all.
    """

    def __init__(self, device: Any, chunk_mb: int = 8, direct: Optional[bool] = None, torch_mod: Any = None):
        self.device = device
        self.chunk_mb = chunk_mb
        self.on_host = getattr(device, "type", "cpu") == "cpu"
        self.direct = bool(direct) and not self.on_host  # CUDA-aware MPI takes device memory as it is
        self._torch = torch_mod
        self._bufs = None  # two pinned host buffers, allocated on first use

    @property
    def torch(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch

    def _buffers(self, n: int):
        if self._bufs is None or self._bufs[0].numel() < n:
            t = self.torch
            self._bufs = [t.empty(n, dtype=t.float32, pin_memory=True) for _ in range(2)]
            self._events = [t.cuda.Event() for _ in range(2)]
            self._stream = t.cuda.Stream(self.device)
        return self._bufs

    def _steps(self, n: int):
        return list(chunks(n, 4, self.chunk_mb))

    def receive(self, dev: Any, recv_chunk: Callable[[Any], None]) -> None:
        if self.on_host:
            arr = dev.numpy()
            for s, e in self._steps(dev.numel()):
                recv_chunk(arr[s:e])
            return
        if self.direct:
            current = self.torch.cuda.current_stream(self.device)
            current.synchronize()  # MPI writes dev outside any stream: the kernels still using it must be done
            for s, e in self._steps(dev.numel()):
                recv_chunk(dev[s:e])
            current.synchronize()
            return
        steps = self._steps(dev.numel())
        bufs = self._buffers(max(e - s for s, e in steps))
        t = self.torch
        # The copies run on a side stream: it must first wait for the work queued on the current stream that may
        # still read or write dev (the last training step, an optimizer update), or the copies would race it.
        self._stream.wait_stream(t.cuda.current_stream(self.device))
        for i, (s, e) in enumerate(steps):
            k = i % 2
            self._events[k].synchronize()  # the copy out of this buffer (chunk i-2) is done
            host = bufs[k][:e - s]
            recv_chunk(host.numpy())  # MPI fills chunk i while chunk i-1 goes to the device
            with t.cuda.stream(self._stream):
                dev[s:e].copy_(host, non_blocking=True)
                self._events[k].record(self._stream)
        self._stream.synchronize()

    def send(self, dev: Any, send_chunk: Callable[[Any], None]) -> None:
        if self.on_host:
            arr = dev.numpy()
            for s, e in self._steps(dev.numel()):
                send_chunk(arr[s:e])
            return
        if self.direct:
            self.torch.cuda.current_stream(self.device).synchronize()
            for s, e in self._steps(dev.numel()):
                send_chunk(dev[s:e])
            return
        steps = self._steps(dev.numel())
        bufs = self._buffers(max(e - s for s, e in steps))
        t = self.torch
        t.cuda.current_stream(self.device).synchronize()  # dev is final before any copy starts

        def start(i: int) -> None:
            s, e = steps[i]
            with t.cuda.stream(self._stream):
                bufs[i % 2][:e - s].copy_(dev[s:e], non_blocking=True)
                self._events[i % 2].record(self._stream)

        start(0)
        for i, (s, e) in enumerate(steps):
            if i + 1 < len(steps):
                start(i + 1)  # chunk i+1 comes down while MPI sends chunk i
            self._events[i % 2].synchronize()
            send_chunk(bufs[i % 2][:e - s].numpy())

    def to_host(self, dev: Any, out: np.ndarray) -> np.ndarray:
        """``out[...] = dev`` (a whole flat tensor), staged like :meth:`send`."""
        if self.on_host:
            np.copyto(out, dev.numpy())
            return out
        pos = [0]

        def put(chunk: Any) -> None:
            n = len(chunk)
            out[pos[0]:pos[0] + n] = chunk.cpu().numpy() if hasattr(chunk, "cpu") else chunk
            pos[0] += n

        self.send(dev, put)
        return out

    def from_host(self, src: np.ndarray, dev: Any) -> None:
        """``dev[...] = src``, staged like :meth:`receive`."""
        if self.on_host:
            np.copyto(dev.numpy(), src)
            return
        pos = [0]

        def get(chunk: Any) -> None:
            n = len(chunk)
            if hasattr(chunk, "copy_"):
                chunk.copy_(self.torch.from_numpy(src[pos[0]:pos[0] + n]))
            else:
                chunk[...] = src[pos[0]:pos[0] + n]
            pos[0] += n

        self.receive(dev, get)


class Precision:
    """Mixed precision for the local training step: autocast, and loss scaling for fp16.

    The federation keeps exchanging fp32 weights: only activations (and, under
    autocast, the matmuls) run in bf16/fp16. fp16's loss scale starts fresh every
    round, like the optimizer, and uses torch's own scaler kernels on the flat gradient.
    """

    def __init__(self, kind: str, device: Any):
        import torch

        if kind not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision: {kind!r} is not fp32, bf16 or fp16")
        self.kind, self.device, self.torch = kind, device, torch
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(kind)
        self.scaled = kind == "fp16"
        self.reset()

    def reset(self) -> None:
        if self.scaled:
            t = self.torch
            self.scale = t.full((), 2.0 ** 16, dtype=t.float32, device=self.device)
            self.growth_tracker = t.zeros((), dtype=t.int32, device=self.device)
            self.found_inf = t.zeros((), dtype=t.float32, device=self.device)

    def autocast(self):
        import contextlib

        if self.dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale_loss(self, loss: Any) -> Any:
        return loss * self.scale if self.scaled else loss

    def unscale_(self, grad: Any) -> Optional[Any]:
        """Undo the loss scale on the (already averaged) flat gradient. Returns None without loss scaling, else
        the 0-dim device flag that is non-zero when the gradient held inf/NaN: the optimizer then skips the step
        on the device (FlatOptimizer.step) and the scale backs off, as GradScaler does, with no host sync."""
        if not self.scaled:
            return None
        t = self.torch
        self.found_inf.zero_()
        t._amp_foreach_non_finite_check_and_unscale_([grad], self.found_inf, self.scale.double().reciprocal().float())
        t._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)
        return self.found_inf


__all__ = ["select_device", "gpu_identity", "device_info", "cuda_aware_mpi", "chunks", "Stager", "Precision"]
