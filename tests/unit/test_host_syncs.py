"""No hidden host syncs in the step loop: one CPU training step (fp16 with loss scaling, and DINO) calls none of
Tensor.item/__float__/__int__/__bool__ (each would wait for the GPU's queue on a GPU). The round's statistics
are read once at its end, which is not part of a step. Also: fp16's device-side skip of a non-finite step is
exact (the same bits as the unmasked step when nothing overflowed; nothing changed when something did)."""
from types import SimpleNamespace as NS

import pytest
import torch

from hpcfl.config import from_dict
from hpcfl.site import SoloBackend
from hpcfl.site.optim import FlatOptimizer
from hpcfl.site.trainer import SiteSettings, SiteTrainer
from hpcfl.tasks import DataSpec, make_task

SYNCS = ("item", "__float__", "__int__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts of the Tensor methods that read a value back to the host, while ``reads.on`` is set."""
    reads = NS(on=False, calls=[])
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if reads.on:
                import traceback

                reads.calls.append((_name, traceback.format_stack(limit=4)[0].strip()))
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _trainer(cfg, spec):
    return SiteTrainer(cfg, make_task(cfg), spec, SoloBackend(), torch.device("cpu"))


def _count_steps(trainer, host_reads, x, y, steps=3):
    """Train ``steps`` steps; count the host reads inside the step function (the round's end is not a step)."""
    real_step = trainer._step

    def step(*a):
        host_reads.on = True
        try:
            real_step(*a)
        finally:
            host_reads.on = False

    trainer._step = step

    class Data:
        def steps_per_epoch(self, bs):
            return steps

        def epoch_batches(self, round_, epoch, bs):
            for _ in range(steps):
                yield x, y

    site = NS(name="a", index=0)
    st = trainer.train_round(site, 1, 1, SiteSettings(lr=0.01, batch_size=len(x), epochs=None, steps=steps), Data())
    assert st.steps == steps
    return host_reads.calls


def test_an_fp16_step_reads_nothing_back(host_reads):
    """fp16's overflow check stays on the device (the optimizer skips a step there); fails where the step asks
    the host whether the gradient was finite (found_inf.item())."""
    cfg = from_dict({"sites": [{"name": "a"}], "data": {"name": "synthetic", "features": 8},
                     "model": {"name": "mlp", "hidden": [16]},
                     "train": {"precision": "fp16", "device": "cpu", "grad_clip": 1.0, "optimizer": "adam"}})
    tr = _trainer(cfg, DataSpec((8,), 3))
    calls = _count_steps(tr, host_reads, torch.randn(4, 8), torch.tensor([0, 1, 2, 1]))
    assert calls == []


def test_a_dino_step_reads_nothing_back(host_reads):
    """Loss sums stay tensors, the centre's row count stays on the device, the colour matrix is inverted once."""
    cfg = from_dict({"sites": [{"name": "a"}], "task": "dino", "data": {"name": "tiles"},
                     "train": {"optimizer": "adamw", "device": "cpu"},
                     "dino": {"width": 4, "depth": 1, "out_dim": 16, "head_hidden": 8, "head_bottleneck": 4,
                              "crops": {"global_size": 16, "local_size": 8, "local_crops": 2}}})
    tr = _trainer(cfg, DataSpec((3, 32, 32), 4))
    calls = _count_steps(tr, host_reads, torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))
    assert calls == []


@pytest.mark.parametrize("kind,kw", [("sgd", dict(momentum=0.9, weight_decay=0.01)), ("sgd", {}),
                                     ("adam", dict(weight_decay=0.01)), ("adamw", dict(weight_decay=0.04))])
def test_the_device_side_skip_is_exact(kind, kw):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, generator=g) for _ in range(6)]
    start = torch.randn(50, generator=g)

    def run(seq, masked):
        p, d = start.clone(), torch.zeros(50)
        opt = FlatOptimizer(p, d, kind, lr=0.01, **kw)
        for k in range(2):  # two rounds: the second starts from stale state that a skip must not bring back
            opt.reset()
            for grad in seq:
                d.copy_(grad)
                bad = not torch.isfinite(grad).all()
                if masked:
                    opt.step(torch.tensor(float(bad)))
                elif not bad:
                    opt.step()
        return p

    # nothing overflowed: the masked step's bits are the unmasked step's
    assert torch.equal(run(grads, True), run(grads, False))
    # the first step of each round and a later one overflowed: skipped, and not counted (Adam's bias correction)
    inf = torch.full((50,), float("inf"))
    seq = [inf] + grads[:3] + [inf] + grads[3:]
    assert torch.equal(run(seq, True), run(grads, False))


def _dino_trainer():
    cfg = from_dict({"sites": [{"name": "a"}], "task": "dino", "data": {"name": "tiles"},
                     "train": {"optimizer": "adamw", "device": "cpu"},
                     "dino": {"width": 4, "depth": 1, "out_dim": 16, "head_hidden": 8, "head_bottleneck": 4,
                              "crops": {"global_size": 16, "local_size": 8, "local_crops": 2}}})
    return _trainer(cfg, DataSpec((3, 32, 32), 4))


def test_the_teacher_follows_the_student_by_one_lerp_over_the_flat_buffer(monkeypatch):
    from hpcfl.tasks.dino.loss import ema_
    from hpcfl.tasks.dino.task import _float_state

    tr = _dino_trainer()
    module = tr.model.module
    teacher, student = _float_state(module.teacher), _float_state(module.student)
    before = [t.clone() for t in teacher]
    with torch.no_grad():
        for s in student:
            s.add_(torch.randn_like(s))
    lerps, foreach = [], []
    real = torch.Tensor.lerp_
    monkeypatch.setattr(torch.Tensor, "lerp_", lambda self, *a, **kw: lerps.append(self.numel()) or real(self, *a, **kw))
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **kw: foreach.append(1))
    ema_(teacher, student, 0.99)
    assert lerps == [sum(t.numel() for t in teacher)] and not foreach  # one lerp_ over the teacher's range
    for t, t0, s in zip(teacher, before, student):  # lerp's rounding, not mul_/add_'s: equal within float32
        torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s, rtol=1e-6, atol=1e-6)


def test_the_colour_matrix_is_inverted_once(monkeypatch):
    from hpcfl.tasks.dino import augment

    calls = []
    real = torch.linalg.inv
    monkeypatch.setattr(torch.linalg, "inv", lambda m: calls.append(1) or real(m))
    monkeypatch.setattr(augment, "_YIQ_PAIRS", {})
    tr = _dino_trainer()
    _count_steps(tr, NS(on=False, calls=[]), torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))
    assert calls == [1]  # three steps, eight jittered views each: one inversion
