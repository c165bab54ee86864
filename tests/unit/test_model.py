import numpy as np
import pytest
import torch

from hpcfl.config import from_dict
from hpcfl.model import FlatModel, build_model
from hpcfl.errors import ConfigError


def make(**model):
    cfg = from_dict({"sites": [{"name": "a"}], "model": model})
    return build_model(cfg, 64, 10, (1, 8, 8))


def test_parameters_are_views_of_one_buffer():
    torch.manual_seed(0)
    m = make(hidden=[16], batchnorm=True)
    x = torch.randn(5, 1, 8, 8)
    m.eval()
    before = m(x).detach().clone()
    fm = FlatModel(m)
    assert torch.equal(m(x), before)  # re-pointing keeps the values
    n = sum(p.numel() for p in m.parameters()) + 2 * 16  # + BatchNorm running mean/var
    assert fm.numel == n and fm.array.dtype == np.float32
    fm.array[:] = 0.0  # what an MPI receive does
    assert all(float(p.detach().abs().sum()) == 0.0 for p in m.parameters())
    assert m[2].num_batches_tracked.dtype == torch.int64  # integer buffers are not exchanged


def test_training_updates_the_buffer():
    m = make(hidden=[8])
    fm = FlatModel(m)
    before = fm.array.copy()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    assert not np.array_equal(before, fm.array)


def test_signature_depends_on_architecture():
    assert FlatModel(make(hidden=[8])).signature() == FlatModel(make(hidden=[8])).signature()
    assert FlatModel(make(hidden=[8])).signature() != FlatModel(make(hidden=[9])).signature()


def test_cnn_and_factory_models(tmp_path, monkeypatch):
    assert isinstance(make(name="cnn"), torch.nn.Module)
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def linear(num_features, num_classes, bias=True):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(num_features, num_classes, bias=bias))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = make(name="my_models:linear", args={"bias": False})
    assert m[1].weight.shape == (10, 64) and m[1].bias is None
    with pytest.raises(ConfigError, match=r"model.name: my_models:linear\(num_features=..., num_classes=..., \*\*model.args\) failed"):
        make(name="my_models:linear", args={"width": 3})
    with pytest.raises(ConfigError, match="model.name: cannot import 'nope.mod:f'"):
        make(name="nope.mod:f")
    with pytest.raises(ConfigError, match="model.name: 'resnet'"):
        make(name="resnet")


def test_non_float32_models_are_refused():
    with pytest.raises(ConfigError, match="float64"):
        FlatModel(torch.nn.Linear(2, 2).double())


class _TwoHeads(torch.nn.Module):
    """A model whose second head the loss reaches only when asked: a parameter without a gradient."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def forward(self, x, both=True):
        h = self.body(x)
        return self.a(h) + (self.b(h) if both else 0.0)


def test_collected_gradients_are_this_backward_only():
    """release_grads + backward + collect_grads gives ``grad`` what torch computes for that one backward:
    fresh values (not added to the last step's), zeros where the loss did not reach, the views re-attached."""
    torch.manual_seed(0)
    ref = _TwoHeads()
    fm = FlatModel(_TwoHeads())
    with torch.no_grad():
        for p, q in zip(fm.module.parameters(), ref.parameters()):
            p.copy_(q)
    x = torch.randn(5, 4)
    for both in (True, False, True):
        fm.release_grads()
        fm.module(x, both).pow(2).sum().backward()
        fm.collect_grads()
        ref.zero_grad(set_to_none=True)
        ref(x, both).pow(2).sum().backward()
        want = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                          for q in ref.parameters()])
        assert torch.equal(fm.grad, want)
        for p, (start, stop) in zip(fm.module.parameters(), ((e.offset, e.offset + e.numel) for e in fm.entries)):
            assert p.grad.data_ptr() == fm.grad[start:stop].data_ptr()  # the views again, not the fresh tensors
