"""Stain jitter (hpcfl.stain) and the cnn's model.stain_jitter option."""
import math

import numpy as np
import pytest

from hpcfl.config import from_dict
from hpcfl.errors import ConfigError
from hpcfl.model import build_model
from hpcfl.stain import scale_optical_density, stain_jitter

torch = pytest.importorskip("torch")


def test_optical_density_is_scaled_per_channel():
    # one image, 2 channels, 1x3 pixels; channel 0 doubled in OD, channel 1 halved
    x = torch.tensor([[[[0.25, 1.0, 0.0]], [[0.25, 0.81, 1.0]]]])
    k = torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
    out = scale_optical_density(x, k)
    # by hand: 0.25**2 = 0.0625, glass (1.0) stays 1, black (0) stays 0; 0.25**0.5 = 0.5, 0.81**0.5 = 0.9
    np.testing.assert_allclose(out.numpy(), [[[[0.0625, 1.0, 0.0]], [[0.5, 0.9, 1.0]]]], rtol=1e-6)
    # -log(out) = k * -log(x): the Beer-Lambert reading
    assert math.isclose(-math.log(float(out[0, 0, 0, 0])), 2.0 * -math.log(0.25), rel_tol=1e-6)


def test_values_outside_the_unit_range_are_clamped_not_turned_into_nan():
    out = scale_optical_density(torch.tensor([-0.5, 1.5]), torch.tensor(0.5))
    np.testing.assert_allclose(out.numpy(), [0.0, 1.0])


def test_one_factor_per_image_and_channel_from_the_generator():
    x = torch.full((3, 3, 4, 4), 0.5)
    out = stain_jitter(x, 0.3, torch.Generator().manual_seed(7))
    z = torch.randn((3, 3, 1, 1), generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(out.numpy(), (0.5 ** torch.exp(0.3 * z)).expand(3, 3, 4, 4).numpy(), rtol=1e-6)
    # constant within an image's channel, different between images and channels
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out)) and len(torch.unique(out)) == 9


SITES = [{"name": "a"}]


def _cfg(**model):
    return from_dict({"sites": SITES, "data": {"name": "tiles"}, "model": {"name": "cnn", "conv_blocks": 2, **model}})


def test_jittered_cnn_has_the_plain_cnns_names_and_is_it_in_eval_mode():
    torch.manual_seed(0)
    plain = build_model(_cfg(), 3 * 16 * 16, 4, (3, 16, 16))
    torch.manual_seed(0)
    jit = build_model(_cfg(stain_jitter=0.3), 3 * 16 * 16, 4, (3, 16, 16))
    assert type(plain) is torch.nn.Sequential and type(jit) is not torch.nn.Sequential
    assert list(plain.state_dict()) == list(jit.state_dict())
    x = torch.rand(5, 3, 16, 16)
    plain.eval()
    jit.eval()
    assert torch.equal(plain(x), jit(x))
    jit.train()
    plain.train()
    torch.manual_seed(1)
    a = jit(x)
    torch.manual_seed(1)
    assert torch.equal(a, jit(x))  # reproducible from torch's seed (the trainer seeds it per round and rank)
    assert not torch.allclose(a, plain(x))
    assert "stain_jitter=0.3" in repr(jit)


def test_stain_jitter_on_another_model_is_refused_in_one_line():
    cfg = from_dict({"sites": SITES, "model": {"name": "mlp", "stain_jitter": 0.2}})
    with pytest.raises(ConfigError, match=r"^model\.stain_jitter: only the built-in cnn applies it \(model\.name is 'mlp'\)"):
        build_model(cfg, 64, 10, (64,))


def test_stain_jitter_range_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="model.stain_jitter"):
        from_dict({"sites": SITES, "model": {"name": "cnn", "stain_jitter": -0.1}})
