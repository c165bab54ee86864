"""SGD straight from autograd's gradients (FlatOptimizer.sgd_part, the trainer's CPU fast path) against the
flat step it replaces and torch.optim.SGD: the same bits, step after step, round after round."""
import pytest
import torch
import torch.nn.functional as F

from hpcfl.config import from_dict
from hpcfl.model import FlatModel
from hpcfl.site import SoloBackend
from hpcfl.site.optim import FlatOptimizer
from hpcfl.site import trainer as trainer_mod
from hpcfl.site.trainer import SiteSettings, SiteTrainer
from hpcfl.tasks import DataSpec
from hpcfl.tasks.classify import ClassifyTask


class Net(torch.nn.Module):
    """Odd sizes (vector kernels' tails fall at other elements per tensor than in the flat buffer), a conv,
    and a head the loss reaches only on request (a parameter without a gradient)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.fc = torch.nn.Linear(5 * 5 * 5, 37)
        self.out = torch.nn.Linear(37, 7)
        self.spare = torch.nn.Linear(37, 7)

    def forward(self, x, spare=False):
        h = torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))
        return self.out(h) + (self.spare(h) if spare else 0.0)


def batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 7, 7, generator=g), torch.randint(0, 7, (4,), generator=g)) for _ in range(n)]


def flat_net():
    torch.manual_seed(0)
    fm = FlatModel(Net())
    return fm, [(e.offset, e.numel, e.shape) for e in fm.entries[:len(fm.views())]]


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.9, 5e-4)])
def test_sgd_from_gradients_is_the_flat_step(momentum, wd):
    a, slices = flat_net()
    b, _ = flat_net()
    oa = FlatOptimizer(a.flat[:a.num_trainable], a.grad, "sgd", lr=0.05, momentum=momentum, weight_decay=wd)
    ob = FlatOptimizer(b.flat[:b.num_trainable], b.grad, "sgd", lr=0.05, momentum=momentum, weight_decay=wd)
    ref = Net()
    ref.load_state_dict(a.module.state_dict())
    for p in ref.parameters():  # the spare head's gradient is zeros, not None, as in the flat buffer
        p.grad = torch.zeros_like(p)
    for rnd in range(2):
        oa.reset(), ob.reset()
        opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=wd, foreach=False)
        for x, y in batches():
            a.release_grads()
            F.cross_entropy(a.module(x), y).backward()
            assert a.module.spare.weight.grad is None  # the spare head got no gradient: zeros in the flat one
            a.collect_grads()
            oa.step()
            b.release_grads()
            b.module.spare.requires_grad_(False)  # b: every trainable entry reached ...
            F.cross_entropy(b.module(x), y).backward()
            b.module.spare.requires_grad_(True)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.views()]
            ob.sgd_part(b.views(), grads, slices)  # ... the spare one's zeros passed as a tensor
            ob.finish_sgd()
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(ref(x), y).backward()
            opt.step()
            assert torch.equal(a.flat, b.flat)
            assert all(torch.equal(p, q) for p, q in zip(b.module.parameters(), ref.parameters()))


def trainer(**train):
    cfg = from_dict({"sites": [{"name": "a"}], "data": {"name": "digits"}, "model": {"name": f"{__name__}:factory"},
                     "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 4, **train}})
    return SiteTrainer(cfg, ClassifyTask(cfg), DataSpec((3, 7, 7), 7), SoloBackend(), torch.device("cpu"))


def factory(num_features, num_classes, **_):
    torch.manual_seed(0)
    net = Net()  # its spare head is never reached: weight decay still moves it, as the flat step does
    net.forward = lambda x: net.out(torch.relu(net.fc(torch.relu(net.conv(x)).flatten(1))))
    return net


class Data:
    num_train = 24

    def steps_per_epoch(self, bs):
        return 6

    def epoch_batches(self, round_, epoch, bs):
        return iter(batches())


class Site:
    name, index = "a", 0


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("momentum,wd", [(0.9, 0.0), (0.0, 0.0), (0.9, 1e-3)])
def test_the_trainer_takes_the_direct_step_only_where_nothing_else_needs_the_flat_gradient(momentum, wd, in_backward,
                                                                                           monkeypatch):
    monkeypatch.setattr(trainer_mod, "IN_BACKWARD_MIN", 0 if in_backward else 1 << 40)
    assert trainer().direct_sgd
    assert not trainer(grad_clip=1.0).direct_sgd
    assert not trainer(optimizer="adam").direct_sgd
    fast, slow = trainer(momentum=momentum, weight_decay=wd), trainer(momentum=momentum, weight_decay=wd)
    assert fast.in_backward == in_backward
    slow.direct_sgd = False
    settings = SiteSettings(lr=0.05, batch_size=4, epochs=1, steps=None)
    spare = fast.model.module.spare.weight.detach().clone()
    for r in (1, 2):
        fast.train_round(Site, 0, r, settings, Data())
        slow.train_round(Site, 0, r, settings, Data())
        assert torch.equal(fast.model.flat, slow.model.flat)
    assert torch.equal(fast.model.module.spare.weight, spare) == (wd == 0)  # only weight decay moves it
    parts, ends = [], []
    fast.optimizer.sgd_part = lambda ps, *a: parts.append(len(ps))  # the direct path is the one that ran
    fast.optimizer.finish_sgd = lambda: ends.append(1)
    fast.train_round(Site, 0, 3, settings, Data())
    assert len(ends) == 6 and sum(parts) == 6 * (6 + 2 * (momentum != 0 or wd != 0))
    assert len(parts) == 6 * ((6 if in_backward else 1) + 2 * (momentum != 0 or wd != 0))  # per parameter, or one


def test_the_direct_step_frees_autograds_gradients_at_once(monkeypatch):
    """In a large model each gradient a direct step read is dropped inside the backward pass, where autograd
    used to free it after adding it into the flat gradient (kept until the pass ended, they grew the heap)."""
    monkeypatch.setattr(trainer_mod, "IN_BACKWARD_MIN", 0)
    tr = trainer()
    seen = []
    real = tr.optimizer.sgd_part
    tr.optimizer.sgd_part = lambda ps, gs, sl: (seen.append(sum(p.grad is not None for p in tr.model.views())),
                                                real(ps, gs, sl))
    tr.train_round(Site, 0, 1, SiteSettings(lr=0.05, batch_size=4, epochs=1, steps=None), Data())
    assert all(p.grad is None for p in tr.model.views())
    assert seen[:6] == [1, 1, 1, 1, 1, 1]  # at most the one being stepped is held, never all of them


def test_a_small_model_steps_after_the_backward_pass_and_frees_the_gradients_then():
    tr = trainer()
    assert not tr.in_backward  # under IN_BACKWARD_MIN entries: a hook per parameter would cost more than it saves
    tr.train_round(Site, 0, 1, SiteSettings(lr=0.05, batch_size=4, epochs=1, steps=None), Data())
    assert all(p.grad is None for p in tr.model.views())
