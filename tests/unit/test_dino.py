"""DINO (hpcfl/tasks/dino): loss, schedules, centre, EMA, multi-crop, exchange and evaluation,
against values computed by hand."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcfl.config import Config, DinoConfig, DinoCropsConfig, from_dict
from hpcfl.errors import ConfigError
from hpcfl.site import SoloBackend
from hpcfl.tasks.base import DataSpec, SiteGroup, StepContext, matching
from hpcfl.tasks.dino import DinoTask
from hpcfl.tasks.dino.augment import multicrop, normalize
from hpcfl.tasks.dino.evaluate import LinearProbe, knn_predict
from hpcfl.tasks.dino.loss import dino_loss, teacher_momentum, teacher_temperature

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


# -------------------------------------------------------------------------------------------- helpers

class ListGroup(SiteGroup):
    """A site's ranks simulated in one process: ``contrib`` holds every rank's tensor for the next
    collective (rank order); this rank is ``rank``."""

    def __init__(self, rank: int, contrib: list):
        self.rank, self.size, self.contrib = rank, len(contrib), contrib

    def allreduce_sum_(self, tensor):
        tensor.copy_(sum(c.to(tensor.dtype) for c in self.contrib))

    def allgather(self, tensor):
        parts = list(self.contrib)
        parts[self.rank] = tensor
        return torch.cat(parts)

    def broadcast_(self, tensor, root=0):
        tensor.copy_(self.contrib[root])


def tiny(**over) -> DinoConfig:
    crops = DinoCropsConfig(global_size=16, local_size=8, local_crops=2)
    base = dict(width=4, depth=1, out_dim=16, head_hidden=8, head_bottleneck=4, crops=crops)
    base.update(over)
    return DinoConfig(**base)


def make_task(d: DinoConfig = None, eval_batch_size: int = 4):
    cfg = SimpleNamespace(dino=d or tiny(), train=SimpleNamespace(eval_batch_size=eval_batch_size),
                          data=SimpleNamespace(name="tiles"))
    return DinoTask(cfg)


def ctx(round_=1, rounds=1, step=0, steps_per_round=10, steps_per_epoch=10, group=None) -> StepContext:
    return StepContext(round=round_, rounds=rounds, step=step, steps_per_round=steps_per_round,
                       steps_per_epoch=steps_per_epoch, site="a", site_index=0, device=torch.device("cpu"),
                       group=group or SoloBackend())


def built(d: DinoConfig = None, seed: int = 0):
    task = make_task(d)
    torch.manual_seed(seed)
    return task, task.build_model(DataSpec((3, 32, 32), 4))


# -------------------------------------------------------------------------------------------- the loss

def _example(c, tt, ts):
    """Teacher/student logits whose softmaxes are simple fractions (see test_loss_hand_computed)."""
    teacher = torch.tensor([[tt * LN3, 0, 0], [0, tt * math.log(4), 0]], dtype=torch.float64) + c
    student = torch.tensor([[ts * LN2, 0, 0], [0, 0, 0], [0, ts * LN2, ts * LN2]], dtype=torch.float64)
    return student, teacher


def test_loss_hand_computed():
    # Teacher views (centred, / 0.04): q0 = [3/5, 1/5, 1/5], q1 = [1/6, 4/6, 1/6].
    # Student crops (/ 0.1): p0 = [1/2, 1/4, 1/4] (global), p1 = uniform (global), p2 = [1/5, 2/5, 2/5] (local).
    # Pairs: q0 with p1 and p2, q1 with p0 and p2 (never a view with itself):
    #   CE(q0, p1) = ln 3;  CE(q0, p2) = 0.6 ln 5 + 0.4 ln 5/2;  CE(q1, p0) = 11/6 ln 2;  CE(q1, p2) = 1/6 ln 5 + 5/6 ln 5/2.
    c = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    student, teacher = _example(c, 0.04, 0.1)
    loss, entropy, kl = dino_loss(student, teacher, c, 3, student_temp=0.1, teacher_temp=0.04)
    expected = (LN3 + (LN5 - 0.4 * LN2) + 11 / 6 * LN2 + (LN5 - 5 / 6 * LN2)) / 4
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    h0 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.2))
    h1 = -(2 / 6 * math.log(1 / 6) + 4 / 6 * math.log(4 / 6))
    assert float(entropy) == pytest.approx((h0 + h1) / 2, abs=1e-6)
    assert float(kl) == pytest.approx(expected - (h0 + h1) / 2, abs=1e-6)


def test_loss_depends_on_centre_and_temperatures():
    c = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    student, teacher = _example(c, 0.04, 0.1)
    # Without the centre the teacher's softmax changes; so do other temperatures.
    base = float(dino_loss(student, teacher, c, 3, 0.1, 0.04)[0])
    assert float(dino_loss(student, teacher, torch.zeros_like(c), 3, 0.1, 0.04)[0]) != pytest.approx(base, abs=1e-3)
    assert float(dino_loss(student, teacher, c, 3, 0.2, 0.04)[0]) != pytest.approx(base, abs=1e-3)
    assert float(dino_loss(student, teacher, c, 3, 0.1, 0.08)[0]) != pytest.approx(base, abs=1e-3)


def test_loss_batch_is_view_major():
    # Two samples: a = the example above, b = the same student crops with teachers that are the centre
    # itself (uniform q). Rows are view-major: [crop0 a, crop0 b, crop1 a, crop1 b, ...].
    c = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    student, teacher = _example(c, 0.04, 0.1)
    s2 = torch.stack([student, student], 1).reshape(6, 3)
    t2 = torch.stack([teacher, c.expand(2, 3)], 1).reshape(4, 3)
    loss, entropy, _ = dino_loss(s2, t2, c, 3, 0.1, 0.04)
    a = (LN3 + (LN5 - 0.4 * LN2) + 11 / 6 * LN2 + (LN5 - 5 / 6 * LN2)) / 4
    # uniform q: CE(u, p1) = ln 3, CE(u, p2) = ln 5 - 2/3 ln 2, CE(u, p0) = 5/3 ln 2, CE(u, p2) again
    b = (LN3 + (LN5 - 2 / 3 * LN2) + 5 / 3 * LN2 + (LN5 - 2 / 3 * LN2)) / 4
    assert float(loss) == pytest.approx((a + b) / 2, abs=1e-6)
    h0 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.2))
    h1 = -(2 / 6 * math.log(1 / 6) + 4 / 6 * math.log(4 / 6))
    assert float(entropy) == pytest.approx((h0 + h1 + 2 * LN3) / 4, abs=1e-6)


# -------------------------------------------------------------------------------------------- schedules

def test_teacher_momentum_cosine():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(25, 100, 0.996) == pytest.approx(1 - 0.002 * (1 + math.sqrt(0.5)))
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert teacher_momentum(150, 100, 0.996) == pytest.approx(1.0)


def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(7.5, 0.04, 0.07, 30) == pytest.approx(0.0475)
    assert teacher_temperature(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(100, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(3, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_task_uses_the_temperature_of_the_global_epoch():
    # Round 3 of 4, step 5 of 10 per round, 4 steps per epoch: global step 25, epoch 6.25;
    # warm-up 0.04 -> 0.07 over 12.5 epochs: 0.04 + 0.03 * 6.25 / 12.5 = 0.055.
    d = tiny(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=12.5)
    task, module = built(d)
    c = ctx(round_=3, rounds=4, step=5, steps_per_round=10, steps_per_epoch=4)
    assert c.epoch == pytest.approx(6.25)
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)
    got = float(task.loss(module, (x, None), c)[0].detach())
    torch.manual_seed(1)
    g, loc = multicrop(x, d.crops)
    with torch.no_grad():
        s, t = module.student([g, loc]), module.teacher([g])
    want = float(dino_loss(s, t, module.center, 4, d.student_temp, 0.055)[0])
    other = float(dino_loss(s, t, module.center, 4, d.student_temp, 0.07)[0])
    assert got == pytest.approx(want, abs=1e-6)
    assert got != pytest.approx(other, abs=1e-4)


def test_teacher_ema_uses_the_global_step():
    task, module = built(tiny(teacher_momentum=0.996))
    teacher0 = {n: p.clone() for n, p in module.teacher.named_parameters()}
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    c = ctx(round_=2, rounds=4, step=3, steps_per_round=10)  # global step 13 of 40
    task.loss(module, (torch.rand(2, 3, 32, 32), None), c)
    task.after_step(module, c)
    m = 1 - (1 - 0.996) * (1 + math.cos(math.pi * 13 / 40)) / 2
    for n, p in module.teacher.named_parameters():
        student = dict(module.student.named_parameters())[n]
        assert torch.allclose(p, m * teacher0[n] + (1 - m) * student, atol=1e-6), n


def test_teacher_starts_equal_without_gradients():
    task, module = built()
    for (n, s), (_, t) in zip(module.student.named_parameters(), module.teacher.named_parameters()):
        assert torch.equal(s, t), n
        assert not t.requires_grad
    names = [n for n, _ in task.trainable(module)]
    assert names and all(n.startswith("student.") for n in names)
    assert "student.head.g" not in names  # norm_last_layer: the gain stays 1


# -------------------------------------------------------------------------------------------- the centre

def test_centre_is_the_mean_over_the_sites_ranks_only():
    """Two ranks of one site with different batches (3 and 5 tiles): both end with
    centre = 0.9 c0 + 0.1 * (mean of the 2 x 8 teacher outputs of the two ranks)."""
    task0, module0 = built()
    task1, module1 = built()
    c0 = torch.linspace(-1, 1, module0.center.numel()).view_as(module0.center)
    outputs = []
    for module in (module0, module1):
        module.center.copy_(c0)
        module.teacher.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach().clone()))
    torch.manual_seed(0)
    task0.loss(module0, (torch.rand(3, 3, 32, 32), None), ctx())
    task1.loss(module1, (torch.rand(5, 3, 32, 32), None), ctx())
    contrib = [task0._center_sums.clone(), task1._center_sums.clone()]
    task0.after_step(module0, ctx(group=ListGroup(0, contrib)))
    task1.after_step(module1, ctx(group=ListGroup(1, contrib)))
    batch_mean = torch.cat(outputs).mean(0, keepdim=True)
    assert len(torch.cat(outputs)) == 16
    expected = 0.9 * c0 + 0.1 * batch_mean
    assert torch.allclose(module0.center, expected, atol=1e-6)
    assert torch.allclose(module1.center, expected, atol=1e-6)
    alone = 0.9 * c0 + 0.1 * outputs[0].mean(0, keepdim=True)  # what rank 0 would get without its group
    assert not torch.allclose(module0.center, alone, atol=1e-4)


# -------------------------------------------------------------------------------------------- exchange

@pytest.mark.parametrize("exchange,center,groups", [
    ("student", "kept", {"student"}),
    ("student", "averaged", {"student", "center"}),
    ("student_teacher", "kept", {"student", "teacher"}),
    ("student_teacher", "averaged", {"student", "teacher", "center"}),
])
def test_exchanged_patterns(exchange, center, groups):
    task, module = built(tiny(exchange=exchange, center=center))
    names = [n for n, t in module.state_dict().items() if torch.is_floating_point(t)]
    got = set(matching(names, task.exchanged()))
    want = {n for n in names if n.split(".")[0] in groups}
    assert got == want
    assert ("center" in got) == (center == "averaged")
    assert any(n.startswith("teacher.") for n in names) and any(n.startswith("student.") for n in names)


# -------------------------------------------------------------------------------------------- multi-crop

def test_multicrop_shapes_and_determinism():
    d = tiny()
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(5)
    g, loc = multicrop(x, d.crops)
    assert g.shape == (6, 3, 16, 16) and loc.shape == (6, 3, 8, 8)
    torch.manual_seed(5)
    g2, loc2 = multicrop(x, d.crops)
    assert torch.equal(g, g2) and torch.equal(loc, loc2)
    torch.manual_seed(6)
    g3, _ = multicrop(x, d.crops)
    assert not torch.allclose(g, g3)
    none = dataclasses.replace(d.crops, local_crops=0)
    assert multicrop(x, none)[1].shape == (0, 3, 8, 8)


def _plain(**over):
    base = dict(global_size=16, local_size=8, local_crops=1, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                flip=False, rotate=False, jitter=0.0, hue=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                blur_prob=(0.0, 0.0, 0.0), solarize_prob=0.0)
    base.update(over)
    return DinoCropsConfig(**base)


def test_full_scale_crops_are_the_resized_image():
    x = torch.rand(2, 3, 32, 32)
    g, loc = multicrop(x, _plain())
    half = torch.nn.functional.avg_pool2d(x, 2)  # bilinear sampling at exactly half size = 2x2 means
    assert torch.allclose(g, normalize(torch.cat([half, half])), atol=1e-5)
    # a quarter of the size: bilinear sampling at 4i + 1.5 averages the middle 2 x 2 of every 4 x 4 block
    quarter = x.view(2, 3, 8, 4, 8, 4)[:, :, :, 1:3, :, 1:3].mean((3, 5))
    assert torch.allclose(loc, normalize(quarter), atol=1e-5)


def test_flips_and_rotations_are_the_eight_symmetries():
    x = torch.rand(1, 3, 32, 32)
    half = normalize(torch.nn.functional.avg_pool2d(x, 2))[0]
    sym = [torch.rot90(h, k, (1, 2)) for h in (half, half.flip(2)) for k in range(4)]
    torch.manual_seed(0)
    g, _ = multicrop(x.expand(40, -1, -1, -1), _plain(flip=True, rotate=True))
    hits = set()
    for crop in g:
        match = [i for i, s in enumerate(sym) if torch.allclose(crop, s, atol=1e-5)]
        assert len(match) == 1
        hits.add(match[0])
    assert hits == set(range(8))


def test_crops_cover_the_configured_area():
    # Every crop covers exactly the drawn area fraction (here 1/4), lies inside the image, and has an
    # aspect ratio in [3/4, 4/3].
    torch.manual_seed(0)
    from hpcfl.tasks.dino.augment import crop_params

    theta = crop_params(1000, (0.25, 0.25), False, False, torch.zeros(1))
    area = (theta[:, 0, 0] * theta[:, 1, 1]).abs()
    assert torch.allclose(area, torch.full_like(area, 0.25), atol=1e-6)
    assert (theta[:, 0, 2].abs() <= 1 - theta[:, 0, 0] + 1e-6).all()  # inside the image
    ratio = theta[:, 0, 0] / theta[:, 1, 1]
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6


# -------------------------------------------------------------------------------------------- labels

def test_labels_never_reach_the_loss():
    task, module = built()
    assert task.supervised is False
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    a = task.loss(module, (x, None), ctx())[0]
    torch.manual_seed(3)
    b = task.loss(module, (x, "garbage"), ctx())[0]
    torch.manual_seed(3)
    c = task.loss(module, (x, torch.tensor([7, -3])), ctx())[0]
    assert float(a.detach()) == float(b.detach()) == float(c.detach())


# -------------------------------------------------------------------------------------------- evaluation

def test_knn_weighted_vote_by_hand():
    # Query along x. Class 0: one feature at cos 1. Class 1: two features at cos 0.5.
    bank = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[2.0, 0.0]])
    # T = 0.07: e^(1/0.07) > 2 e^(0.5/0.07): class 0. T = 1: e < 2 e^0.5: class 1.
    assert knn_predict(bank, labels, q, 2, k=20, temperature=0.07).tolist() == [0]
    assert knn_predict(bank, labels, q, 2, k=20, temperature=1.0).tolist() == [1]
    assert knn_predict(bank, labels, q, 2, k=1, temperature=1.0).tolist() == [0]  # the nearest alone
    assert knn_predict(bank, labels, q, 2, k=2, temperature=1.0).tolist() == [0]  # e^1 vs e^0.5
    assert knn_predict(bank[:0], labels[:0], q, 2).tolist() == [0]  # an empty bank does not crash


def test_linear_probe_is_deterministic_and_separates():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 3, generator=g) + 3, torch.randn(20, 3, generator=g) - 3])
    y = torch.tensor([0] * 20 + [1] * 20)
    a, b = LinearProbe(x, y, 2), LinearProbe(x, y, 2)
    assert torch.equal(a.weight, b.weight)
    assert a.predict(torch.tensor([[3.0, 3, 3], [-3.0, -3, -3]])).tolist() == [0, 1]


class _MeanColour(torch.nn.Module):
    """Stand-in encoder: a tile's mean colour (after the task's resize and normalisation)."""

    def forward(self, x):
        return x.mean((2, 3))


class _Tiles:
    def __init__(self, train, val):
        self.train, self.val = train, val

    @staticmethod
    def _batches(items, bs):
        for b in range(0, len(items), bs):
            part = items[b:b + bs]
            x = torch.stack([torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) for c, _ in part])
            yield x, torch.tensor([k for _, k in part])

    def train_eval_batches(self, bs):
        return self._batches(self.train, bs)

    def val_batches(self, bs):
        return self._batches(self.val, bs)


def test_evaluate_gathers_the_bank_over_the_sites_ranks():
    """Rank 1 of a 2-rank site holds only class-1 training tiles; rank 0's (class 0) arrive through
    the group's allgather. Its validation share: two tiles near class 0, one near class 1."""
    task, module = built()
    module.teacher.backbone = _MeanColour()
    module.feature_dim = 3
    red, blue = (0.9, 0.1, 0.1), (0.1, 0.1, 0.9)
    rank0_bank = torch.tensor([normalize(torch.tensor(red).view(1, 3, 1, 1)).view(3).tolist()] * 4)
    rank0_labels = torch.zeros(4, dtype=torch.long)
    data = _Tiles(train=[(blue, 1)] * 4, val=[((0.8, 0.2, 0.1), 0), ((0.85, 0.1, 0.2), 0), ((0.2, 0.1, 0.8), 1)])
    groups = iter([ListGroup(1, [rank0_bank, None]), ListGroup(1, [rank0_labels, None])])

    class Gather(ListGroup):
        def allgather(self, tensor):
            return next(groups).allgather(tensor)

    vec = task.evaluate(module, data, ctx(group=Gather(1, [None, None])))
    assert vec.shape == (task.eval_size(DataSpec((3, 32, 32), 4)),)
    counts, knn, probe = vec.reshape(3, 4)
    assert counts.tolist() == [2, 1, 0, 0]
    assert knn.tolist() == [2, 1, 0, 0] and probe.tolist() == [2, 1, 0, 0]
    # Without rank 0's bank every query would be called class 1.
    s = task.summarize(vec + np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))  # another rank: 1 tile of class 0, wrong
    assert s["knn_accuracy"] == pytest.approx(3 / 4) and s["probe_accuracy"] == pytest.approx(3 / 4)
    assert s["knn_balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


# -------------------------------------------------------------------------------------------- config

def test_config_section_and_checks():
    cfg = from_dict({"sites": [{"name": "a"}], "dino": {"width": 8, "crops": {"local_crops": 2}}})
    assert isinstance(cfg, Config) and cfg.dino.width == 8 and cfg.dino.crops.local_crops == 2
    with pytest.raises(ConfigError, match="dino.crops.global_scale"):
        make_task(tiny(crops=DinoCropsConfig(global_scale=(0.9, 0.4))))
    with pytest.raises(ConfigError, match="dino.crops.blur_prob"):
        make_task(tiny(crops=DinoCropsConfig(blur_prob=(0.5,))))
    with pytest.raises(ConfigError, match="dino.heads"):
        make_task(tiny(backbone="vit", width=10, heads=4))
    with pytest.raises(ConfigError, match="task: dino needs images"):
        make_task().build_model(DataSpec((64,), 10))


def test_vit_backbone_takes_both_crop_sizes():
    d = tiny(backbone="vit", width=8, heads=2, patch_size=4)
    task, module = built(d)
    loss, stats = task.loss(module, (torch.rand(2, 3, 32, 32), None), ctx())
    loss.backward()
    assert torch.isfinite(loss) and set(stats) == {"teacher_entropy", "kl"}
    assert module.student.backbone.pos.grad is not None


def test_linear_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g) + 0.5 * torch.randn(300, 3, generator=g)).argmax(1)
    probe = LinearProbe(x, y, 3, iters=200, l2=1e-2)
    z = ((x.double() - probe.mean) / probe.std).numpy()
    # scikit-learn minimises |w|^2 / 2 + C * sum CE, i.e. ours with l2 = 1 / (C N); softmax weights agree up
    # to a constant per feature
    sk = LogisticRegression(C=1 / (300 * 1e-2), tol=1e-10, max_iter=5000).fit(z, y.numpy())
    ours = probe.weight - probe.weight.mean(1, keepdim=True)
    theirs = torch.from_numpy(sk.coef_.T) - torch.from_numpy(sk.coef_.T).mean(1, keepdim=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_rank0_summarizes_without_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom hpcfl.config import from_dict\nfrom hpcfl.tasks import make_task\n"
            "t = make_task(from_dict({'sites': [{'name': 'a'}], 'task': 'dino'}))\n"
            "print(t.summarize([3, 1, 0, 0, 2, 1, 0, 0, 3, 0, 0, 0])['probe_accuracy'], 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0.75", "False"]


def test_encoder_as_a_classify_model():
    from hpcfl.config import from_dict
    from hpcfl.model import build_model

    cfg = from_dict({"sites": [{"name": "a"}], "model": {"name": "hpcfl.tasks.dino.networks:classifier",
                                                         "args": {"width": 4, "size": 16}}})
    model = build_model(cfg, 3 * 32 * 32, 4, (3, 32, 32))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert model.backbone.dim == 16  # 4 x width after 3 stages
    with pytest.raises(ConfigError, match="model.name"):
        build_model(from_dict({"sites": [{"name": "a"}], "model": {"name": "hpcfl.tasks.dino.networks:classifier",
                                                                   "args": {"no_such_key": 1}}}), 12, 4, (3, 2, 2))
