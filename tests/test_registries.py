"""Extending sdeflow from outside the package: a new SDE, a new toy data set, a new loss weighting
and a new network, each added with one register_* call and used through the library's entry points;
duplicates and unknown names are refused with a ValueError that names the argument."""

import io
import math

import pytest
import torch
from torch import nn

import sdeflow
from sdeflow.data import DATASETS, Dataset, get_dataset, register_dataset
from sdeflow.data import sample_toy, toy_log_prob
from sdeflow.training.losses import WEIGHTINGS, register_weighting
from sdeflow.nets import NETS, make_net, register_net
from sdeflow.nets.oracles import ExactScoreNet, GaussianMixture
from sdeflow.sdes.linear import SDES, make_sde, register_sde, sde_config, sde_parameters

from oracle_helpers import ConstantVPSDE, expected_elbo


@pytest.fixture(autouse=True)
def restore_registries():
    """Each test's registrations are undone afterwards, so no other test sees them."""
    registries = (SDES, WEIGHTINGS, DATASETS, NETS)
    saved = [dict(r) for r in registries]
    yield
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)


def _data():
    return GaussianMixture.gaussian(torch.tensor([0.3, -0.5]), torch.tensor([0.6, 0.9]))


# ---- SDEs --------------------------------------------------------------------------------------
def test_a_registered_sde_is_built_by_name_and_its_elbo_is_the_exact_log_likelihood():
    register_sde("constant_vp", ConstantVPSDE)
    assert sde_parameters("constant_vp") == {"beta": 8.0, "T": 1.0}
    sde = make_sde("constant_vp", beta=10.0)
    assert isinstance(sde, ConstantVPSDE) and sde.beta == 10.0
    config = sde_config(sde)
    assert config == {"name": "constant_vp", "beta": 10.0, "T": 1.0}
    assert make_sde(**config) == sde and make_sde("constant_vp") != sde

    data = _data()
    model = sdeflow.PluginReverseSDE(sde, ExactScoreNet(sde, data, "score"), "score").double()
    gen = torch.Generator().manual_seed(0)
    x = data.sample(3, generator=gen, dtype=torch.float64)

    loss = sdeflow.dsm(model, x.repeat(100, 1), generator=gen)
    assert loss.shape == (300,) and torch.isfinite(loss).all()
    # With the exact score, the ELBO is log p(x) up to the prior's closed-form mismatch (< 1e-3 nats
    # here), and its Monte-Carlo estimate is unbiased. The default (fitted) time proposal uses the
    # new SDE's log-SNR and its inverse.
    reps = 2000
    with torch.no_grad():
        elbo = sdeflow.elbo(model, x.repeat(reps, 1), n_slices=2, divergence="exact", generator=gen).reshape(reps, 3)
    mean, se = elbo.mean(0), elbo.std(0) / math.sqrt(reps)
    exact = expected_elbo(sde, data, x)
    assert (exact - data.log_prob(x)).abs().max() < 1e-3
    assert (se < 0.03).all()
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_built_in_sdes_round_trip_through_their_config(name):
    params = sde_parameters(name)
    sde = make_sde(name, **{k: 2 * v for k, v in params.items()})
    config = sde_config(sde)
    assert config["name"] == name and all(type(v) is float for k, v in config.items() if k != "name")
    assert make_sde(**config) == sde
    assert config == {"name": name, **{k: 2 * v for k, v in params.items()}}
    buffer = io.BytesIO()
    torch.save(config, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == config  # plain types only: checkpoints keep it


def test_sde_registry_refuses_duplicates_bad_classes_and_bad_parameters():
    with pytest.raises(ValueError, match="a forward SDE named 'vp' is already registered; choose another name"):
        register_sde("vp", ConstantVPSDE)
    with pytest.raises(ValueError, match="name must be a non-empty string without surrounding spaces"):
        register_sde(" constant_vp", ConstantVPSDE)
    with pytest.raises(ValueError, match="cls must be a concrete subclass of sdeflow.SDE"):
        register_sde("dict", dict)
    with pytest.raises(ValueError, match="cls must be a concrete subclass"):
        register_sde("abstract", sdeflow.SDE)

    class NoDefault(ConstantVPSDE):
        def __init__(self, beta, T=1.0):
            super().__init__(beta, T)

    with pytest.raises(ValueError, match="beta have none"):
        register_sde("no_default", NoDefault)
    with pytest.raises(ValueError, match="name must be one of 'vp', 'subvp', 've', 'cosine', 'discrete'; got 'vpp'"):
        make_sde("vpp")
    with pytest.raises(ValueError, match="unknown parameter.* beta .*allowed: beta_min, beta_max, T"):
        make_sde("vp", beta=1.0)
    with pytest.raises(ValueError, match="beta_min must be a positive finite number"):
        make_sde("vp", beta_min=-1.0)
    with pytest.raises(ValueError, match="sde must be an instance of a registered SDE class"):
        sde_config(ConstantVPSDE())
    assert "constant_vp" not in SDES  # nothing was added by the refusals


# ---- data sets and weightings -------------------------------------------------------------------
def _ring(n, generator=None):
    angle = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1).float() * 1.5


def test_a_registered_toy_set_and_weighting_are_used_through_the_library():
    register_dataset(Dataset("ring", "toy", (2,), "a circle of radius 1.5", sample=_ring))
    assert get_dataset("ring").kind == "toy" and toy_log_prob("ring", torch.zeros(1, 2)) is None
    x = sample_toy("ring", 256, generator=torch.Generator().manual_seed(0))
    assert x.shape == (256, 2) and torch.allclose(x.norm(dim=1), torch.full((256,), 1.5))
    assert torch.equal(x, get_dataset("ring").sample(256, generator=torch.Generator().manual_seed(0)))

    register_weighting("twice", lambda sde, t: 2 * torch.ones_like(t))
    sde = sdeflow.VPSDE()
    model = sdeflow.PluginReverseSDE(sde, make_net("mlp", dim=2, hidden=16, n_blocks=1), "score")
    with torch.no_grad():
        model.net.output.weight.normal_()  # a network that is not the zero function
    # The weighting multiplies the per-time loss: same draws (same seed), twice the noise-weighted loss.
    twice = sdeflow.dsm(model, x, weighting="twice", generator=torch.Generator().manual_seed(1))
    once = sdeflow.dsm(model, x, weighting="noise", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(twice, 2 * once)
    assert once.abs().sum() > 0


def test_likelihood_weighting_is_its_documented_formula():
    sde = sdeflow.VPSDE()
    t = torch.tensor([1e-5, 1e-3, 0.3, 1.0], dtype=torch.float64)
    expected = sde.T * sde.g2(t) / sde.var(t)  # dsm evaluates it at max(t, t_ε)
    torch.testing.assert_close(WEIGHTINGS["likelihood"](sde, t), expected)
    torch.testing.assert_close(WEIGHTINGS["noise"](sde, t), torch.ones_like(t))


def test_data_and_weighting_registries_refuse_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="a dataset named 'moons' is already registered"):
        register_dataset(Dataset("moons", "toy", (2,), "again", sample=_ring))
    with pytest.raises(ValueError, match="dataset must be an sdeflow.data.Dataset"):
        register_dataset({"name": "ring"})
    with pytest.raises(ValueError, match="kind must be one of 'toy', 'image'"):
        Dataset("ring", "video", (2,), "a circle", sample=_ring)
    with pytest.raises(ValueError, match="a toy data set needs a callable sample"):
        Dataset("ring", "toy", (2,), "a circle")
    with pytest.raises(ValueError, match="an? image data set needs a callable load"):
        Dataset("pics", "image", (3, 8, 8), "pictures", sample=_ring)
    with pytest.raises(ValueError, match="dataset must be one of .*'swissroll'.*'cifar10'.*got 'ring'"):
        get_dataset("ring")
    with pytest.raises(ValueError, match="dataset must be one of .*'moons'.*got 'cifar10'"):
        sample_toy("cifar10", 4)  # an image set is not a toy set

    with pytest.raises(ValueError, match="a weighting named 'noise' is already registered"):
        register_weighting("noise", lambda sde, t: torch.ones_like(t))
    with pytest.raises(ValueError, match="fn must be a callable"):
        register_weighting("constant", 1.0)
    model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), make_net("mlp", dim=2, hidden=8, n_blocks=1))
    with pytest.raises(ValueError, match="weighting must be one of 'noise', 'likelihood'; got 'snr'"):
        sdeflow.dsm(model, torch.zeros(4, 2), weighting="snr")


# ---- networks ----------------------------------------------------------------------------------
class Linear(nn.Module):
    def __init__(self, dim: int = 2):
        super().__init__()
        self.layer = nn.Linear(dim + 1, dim)

    def forward(self, y, t):
        return self.layer(torch.cat([y, t[:, None].to(y.dtype)], dim=1))


def test_net_registry():
    register_net("linear", Linear)
    model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), make_net("linear", dim=3))
    assert sdeflow.dsm(model, torch.randn(5, 3)).shape == (5,)
    unet = make_net("unet", preset="small", in_channels=1, image_size=8, channel_mult=[1, 2])
    assert unet(torch.zeros(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)

    with pytest.raises(ValueError, match="a net named 'mlp' is already registered"):
        register_net("mlp", Linear)
    with pytest.raises(ValueError, match="builder must be callable"):
        register_net("nothing", None)
    with pytest.raises(ValueError, match="name must be one of 'unet', 'mlp', 'linear'; got 'cnn'"):
        make_net("cnn")
    with pytest.raises(ValueError, match="unknown parameter.* width .*allowed: dim"):
        make_net("linear", width=4)
    with pytest.raises(ValueError, match="the net 'unet' needs the parameter.* preset"):
        make_net("unet")
    with pytest.raises(ValueError, match="unknown UNet option.*width"):
        make_net("unet", preset="small", width=4)
