"""Device selection, chunk staging and mixed precision, tested on the CPU with fakes where a GPU would be."""
import numpy as np
import pytest
import torch

from hpcfl.device import Precision, Stager, chunks, select_device
from hpcfl.errors import ConfigError


def test_auto_is_the_cpu_without_cuda_and_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="^train.device: cuda, but torch sees no GPU here") as e:
        select_device("cuda")
    assert "\n" not in str(e.value)


def test_auto_picks_the_rank_s_gpu_round_robin(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    assert [select_device("auto", i) for i in range(3)] == [torch.device("cuda", k) for k in (0, 1, 0)]
    assert chosen == [0, 1, 0]


def test_chunks_cover_the_buffer():
    assert list(chunks(10, 4, 0)) == [(i, i + 1) for i in range(10)]  # chunk_mb 0: one element at a time
    got = list(chunks(3 * (1 << 18) + 5, 4, 1))  # 1 MiB of float32 = 2^18 elements
    assert got[0] == (0, 1 << 18) and got[-1][1] == 3 * (1 << 18) + 5 and len(got) == 4


def test_on_the_cpu_mpi_sees_the_tensor_itself():
    flat = torch.arange(10, dtype=torch.float32)
    seen = []
    Stager(torch.device("cpu"), chunk_mb=1).send(flat, lambda buf: seen.append(buf))
    assert len(seen) == 1 and np.shares_memory(seen[0], flat.numpy())
    Stager(torch.device("cpu"), chunk_mb=1).receive(flat, lambda buf: buf.fill(7.0))
    assert torch.equal(flat, torch.full((10,), 7.0))


class FakeEvent:
    """Stands in for torch.cuda.Event: records when the copy it follows was issued and waited for."""

    def __init__(self, log):
        self.log, self.recorded = log, None

    def record(self, stream=None):
        self.recorded = len(self.log)
        self.log.append("record")

    def synchronize(self):
        self.log.append("sync")


class FakeCuda:
    def __init__(self, log):
        self.log = log

    def Event(self):
        return FakeEvent(self.log)

    def Stream(self, device=None):
        return FakeStream(self.log, "stream")

    def stream(self, s):
        import contextlib

        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return FakeStream(self.log, "current")


class FakeStream:
    """A CUDA stream that logs its synchronize and wait_stream calls."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(f"{self.name} sync")

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


class FakeTorch:
    """torch with pinned buffers and a fake CUDA: the copies really happen (on the CPU), events are logged."""

    float32 = torch.float32

    def __init__(self, log):
        self.cuda = FakeCuda(log)

    def empty(self, n, dtype=None, pin_memory=False):
        return torch.empty(n, dtype=dtype)

    def from_numpy(self, a):
        return torch.from_numpy(a)


class LoggedDev:
    """A 'device' tensor whose copies are logged (what crosses the device boundary, and in what order)."""

    def __init__(self, t, log):
        self.t, self.log = t, log

    def numel(self):
        return self.t.numel()

    def __getitem__(self, sl):
        outer = self

        class View:
            def copy_(self, src, non_blocking=False):
                outer.log.append(f"h2d {sl.start}")
                outer.t[sl].copy_(src if isinstance(src, torch.Tensor) else torch.as_tensor(src))

        v = View()
        v.t = self.t[sl]
        return v


def _gpu_stager(log, chunk_mb=1):
    s = Stager(torch.device("cpu"), chunk_mb=chunk_mb, torch_mod=FakeTorch(log))
    s.on_host = False  # pretend the flat tensor lives on a GPU: everything goes through the pinned buffers
    s.device = "cuda:0"
    return s


def test_receive_double_buffers_mpi_against_the_device_copies():
    log = []
    n = 5 * (1 << 18)  # five 1 MiB chunks
    dev = LoggedDev(torch.zeros(n), log)
    src = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    pos = [0]

    def recv(buf):  # "MPI" fills the pinned buffer with the next chunk of rank 0's model
        log.append(f"mpi {pos[0]}")
        buf[...] = src[pos[0]:pos[0] + len(buf)]
        pos[0] += len(buf)

    _gpu_stager(log).receive(dev, recv)
    assert np.array_equal(dev.t.numpy(), src)
    # MPI receives chunk i+1 while chunk i is copied to the device; a buffer is reused only after
    # the copy out of it (two chunks earlier) has been waited for
    order = [x for x in log if x.startswith(("mpi", "h2d", "sync"))]
    step = 1 << 18
    assert order[:4] == ["sync", "mpi 0", "h2d 0", "sync"]
    assert order.index(f"mpi {step}") < order.index(f"h2d {step}")
    third = order.index(f"mpi {2 * step}")
    assert order[third - 1] == "sync"  # before buffer 0 is refilled, its copy (chunk 0) is complete


def test_send_copies_the_next_chunk_down_while_mpi_sends_this_one():
    log = []
    n = 3 * (1 << 18)
    data = torch.from_numpy(np.arange(n, dtype=np.float32))

    class Dev(LoggedDev):
        def __getitem__(self, sl):
            log.append(f"d2h {sl.start}")
            return self.t[sl]

    sent = []
    _gpu_stager(log).send(Dev(data, log), lambda buf: (log.append("mpi"), sent.append(np.array(buf))))
    assert np.array_equal(np.concatenate(sent), data.numpy())
    step = 1 << 18
    first_mpi = log.index("mpi")
    assert log.index(f"d2h {step}") < first_mpi  # chunk 1 was on its way down before chunk 0 went out


def test_the_copy_stream_waits_for_the_current_stream_before_writing_the_device_buffer():
    """The global model lands in dev on a side stream: it must wait for what the current stream still does with
    dev (the last training step), else the copy races it."""
    log = []
    dev = LoggedDev(torch.zeros(3 * (1 << 18)), log)
    _gpu_stager(log).receive(dev, lambda buf: buf.fill(1.0))
    assert "stream waits current" in log and log.index("stream waits current") < log.index("h2d 0")


def test_cuda_aware_mpi_writes_device_memory_only_after_the_current_stream_is_done():
    log = []
    s = _gpu_stager(log)
    s.direct = True  # CUDA-aware MPI: it is handed device memory itself
    dev = torch.zeros(8)
    s.receive(dev, lambda chunk: log.append("mpi writes"))
    assert log == ["current sync", "mpi writes", "current sync"]
    log.clear()
    s.send(dev, lambda chunk: log.append("mpi reads"))
    assert log == ["current sync", "mpi reads"]


def test_to_host_and_from_host_round_trip():
    log = []
    n = 2 * (1 << 18) + 3
    src = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    dev = LoggedDev(torch.zeros(n), log)
    _gpu_stager(log).from_host(src, dev)
    assert np.array_equal(dev.t.numpy(), src)
    out = np.empty(n, np.float32)
    cpu = Stager(torch.device("cpu"))
    cpu.to_host(dev.t, out)
    assert np.array_equal(out, src)


def test_fp16_loss_scaling_unscales_and_skips_non_finite_steps():
    p = Precision("fp16", torch.device("cpu"))
    grad = torch.tensor([2.0 ** 16, -(2.0 ** 17)])
    assert not p.unscale_(grad) and torch.equal(grad, torch.tensor([1.0, -2.0]))  # the flag: no inf/NaN
    bad = torch.tensor([float("inf"), 1.0])
    before = float(p.scale)
    assert p.unscale_(bad)  # the flag is set: the optimizer skips the step
    assert float(p.scale) == before / 2  # backed off, as GradScaler does
    p.reset()
    assert float(p.scale) == 2.0 ** 16  # fresh each round, like the optimizer


def test_bf16_autocast_runs_matmuls_in_bf16_and_fp32_is_untouched():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with Precision("bf16", torch.device("cpu")).autocast():
        assert (x @ w).dtype == torch.bfloat16
    with Precision("fp32", torch.device("cpu")).autocast():
        assert (x @ w).dtype == torch.float32
    with pytest.raises(ConfigError):
        Precision("fp8", torch.device("cpu"))
