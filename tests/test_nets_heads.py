"""A network with a variance head: the layout of its output, how it is built and stored."""

import pytest
import torch

import sdeflow
from sdeflow.storage.checkpoints import load_model, save_checkpoint
from sdeflow.discrete import LearnedVariance
from sdeflow.experiments.images import image_model_config
from sdeflow.nets import MeanAndVariance, make_net
from sdeflow.nets.mlp import MLP


def test_the_head_splits_the_channels_into_the_mean_and_improved_ddpms_interpolation():
    net = MLP(dim=3, learned_variance=True)
    with torch.no_grad():
        net.output.bias.copy_(torch.tensor([1.0, 2.0, 3.0, -1.0, 0.0, 1.0]))
    head = MeanAndVariance(net)
    y, t = torch.zeros(2, 3), torch.full((2,), 0.5)
    mean, v = head.both(y, t)
    torch.testing.assert_close(mean, torch.tensor([[1.0, 2.0, 3.0]] * 2))
    torch.testing.assert_close(v, torch.tensor([[0.0, 0.5, 1.0]] * 2))  # v = (r + 1)/2
    torch.testing.assert_close(head(y, t), mean)
    torch.testing.assert_close(head.variance(y, t), v)
    with pytest.raises(ValueError, match="twice the channels"):
        MeanAndVariance(MLP(dim=3))(y, t)


def test_a_unet_with_a_head_starts_at_the_midpoint_and_survives_a_checkpoint(tmp_path):
    """make_net wraps a net built with learned_variance=True; the zero-initialized output layer starts
    with ε̂ = 0 and v = ½; a checkpoint of the model config rebuilds the same head."""
    config = image_model_config("cifar10", "cpu", in_channels=1, image_size=8,
                                net_overrides={"channel_mult": [1], "base_channels": 4, "learned_variance": True})
    assert isinstance(make_net(**config["net"]), MeanAndVariance)
    torch.manual_seed(0)
    model = sdeflow.build_model(config)
    assert model.net.net.conv_out.out_channels == 2
    y, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.3)
    assert torch.equal(model.predicted_noise(y, t), torch.zeros_like(y))
    assert torch.equal(LearnedVariance.of(model)(y, t), torch.full_like(y, 0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"format": sdeflow.storage.checkpoints.FORMAT, "version": sdeflow.storage.checkpoints.VERSION, "config": config,
             "step": 1, "model": model.state_dict(), "ema": None}
    save_checkpoint(tmp_path / "ckpt-00000001.pt", state)
    loaded, _, _ = load_model(tmp_path, use_ema=False)
    torch.testing.assert_close(loaded.net.both(y, t), model.net.both(y, t))


def test_has_variance_head_answers_for_models_and_networks():
    from sdeflow.nets import has_variance_head

    plain = MLP(dim=2, hidden=8, n_blocks=1)
    head = make_net("mlp", dim=2, hidden=8, n_blocks=1, learned_variance=True)
    assert has_variance_head(head) and not has_variance_head(plain)
    assert has_variance_head(sdeflow.PluginReverseSDE(sdeflow.VPSDE(), head, "noise"))
    assert not has_variance_head(sdeflow.PluginReverseSDE(sdeflow.VPSDE(), plain, "noise"))
