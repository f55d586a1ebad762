import pytest
import torch

import sdeflow

from sdeflow import PluginReverseSDE, VPSDE
from sdeflow.nets.unet import PRESETS, UNet, make_unet, sinusoidal_embedding

# Narrow versions of each preset so a forward pass takes milliseconds.
TINY = dict(base_channels=8, dropout=0.0)


def _tiny(preset, in_channels, image_size, **kw):
    return make_unet(preset, in_channels=in_channels, image_size=image_size, **{**TINY, **kw})


@pytest.mark.parametrize("preset,in_channels,image_size", [("small", 3, 32), ("cifar10", 3, 16),
                                                           ("mnist", 1, 28)])
def test_each_preset_maps_images_to_their_own_shape_and_starts_at_zero(preset, in_channels, image_size):
    net = _tiny(preset, in_channels, image_size)
    for batch in (1, 3):
        y = torch.randn(batch, in_channels, image_size, image_size)
        out = net(y, torch.rand(batch))
        assert out.shape == y.shape
        assert torch.count_nonzero(out) == 0  # zero-initialised final convolution


def test_attention_sits_at_the_requested_resolutions_and_in_the_middle():
    net = UNet(3, 32, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,))
    with_attn = [m for m in net.down if getattr(m, "attn", None) is not None]
    assert len(with_attn) == 1  # level 1 (16×16) only, one block there
    assert net.mid[0].attn is not None and net.mid[1].attn is None
    assert sum(getattr(m, "attn", None) is not None for m in net.up) == 2  # num_res_blocks + 1 going up


def test_small_preset_is_sdeflow_light_sized():
    net = make_unet("small")
    assert abs(sum(p.numel() for p in net.parameters()) - 1.62e6) < 0.01e6
    assert PRESETS["cifar10"]["base_channels"] == 128


def _perturbed(net):
    # Give the zero-initialised layers weights, so that the output depends on everything.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.any():
                p.normal_(std=0.1)
    return net


def test_output_depends_on_time_and_is_deterministic_in_eval():
    net = _perturbed(_tiny("small", 3, 16)).eval()
    y = torch.randn(2, 3, 16, 16)
    a, b = net(y, torch.tensor([0.1, 0.9])), net(y, torch.tensor([0.1, 0.9]))
    assert torch.equal(a, b)
    c = net(y, torch.tensor([0.1, 0.5]))
    assert torch.allclose(a[0], c[0], atol=1e-5) and not torch.allclose(a[1], c[1], atol=1e-3)
    torch.manual_seed(0)
    first = make_unet("small", image_size=16, **TINY)
    torch.manual_seed(0)
    second = make_unet("small", image_size=16, **TINY)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


def test_examples_do_not_interact_and_channels_last_gives_the_same_result():
    # Examples must not interact (Hutchinson's estimator and per-example ELBOs rely on it).
    net = _perturbed(_tiny("small", 3, 16)).eval()
    y, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    full = net(y, t)
    assert torch.allclose(full[1:2], net(y[1:2], t[1:2]), atol=1e-5)
    fast = net.to(memory_format=torch.channels_last)
    assert torch.allclose(fast(y, t), full, atol=1e-5)


def test_attention_equals_explicit_softmax():
    from sdeflow.nets.unet import SelfAttention
    attn = SelfAttention(8)
    with torch.no_grad():
        attn.proj_out.weight.normal_()
    x = torch.randn(2, 8, 4, 4)
    h = attn.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = attn.qkv(h).chunk(3, dim=-1)
    weights = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1)
    expected = x + attn.proj_out(weights @ v).transpose(1, 2).reshape(2, 8, 4, 4)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_trains_inside_the_plugin_reverse_sde():
    torch.manual_seed(0)
    net = _tiny("small", 1, 8, channel_mult=(1, 2), attn_resolutions=(4,))
    model = PluginReverseSDE(VPSDE(), net)
    x = torch.randn(4, 1, 8, 8)
    loss = sdeflow.dsm(model, x, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert net.conv_out.weight.grad.abs().sum() > 0
    elbo = sdeflow.elbo(model, x, time_sampling="importance", generator=torch.Generator().manual_seed(0))
    assert elbo.shape == (4,) and torch.isfinite(elbo).all()


def test_sinusoidal_embedding():
    emb = sinusoidal_embedding(torch.tensor([0.0, 3.0]), 6)
    assert emb.shape == (2, 6)
    assert torch.allclose(emb[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert torch.isclose(emb[1, 0], torch.sin(torch.tensor(3.0)))
    assert sinusoidal_embedding(torch.zeros(1), 5).shape == (1, 5)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="preset must be one of 'cifar10', 'mnist', 'small'"):
        make_unet("huge")
    with pytest.raises(ValueError, match="unknown UNet option"):
        make_unet("small", channels=3)
    with pytest.raises(ValueError, match="image_size must be divisible"):
        UNet(3, 30, base_channels=8, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="dropout"):
        UNet(3, 16, base_channels=8, channel_mult=(1, 2), dropout=1.5)
    net = _tiny("small", 3, 16)
    with pytest.raises(ValueError, match=r"UNet input must have shape \(B, 3, 16, 16\)"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        net(torch.randn(2, 3, 16, 16), torch.rand(2, 1))


@pytest.mark.slow
def test_compiled_blocks_compute_the_same_function():
    net = _perturbed(UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), dropout=0.0)).eval()
    y, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    expected = net(y, t)
    assert torch.allclose(net.compile_blocks()(y, t), expected, atol=1e-5)
