"""Class-conditional networks and classifier-free guidance (sdeflow.samplers.guidance, sdeflow.nets.classes),
checked on a Gaussian mixture whose components are the classes: exact conditional scores exist."""

import math

import pytest
import torch

import sdeflow
from sdeflow import SamplerSettings, guided, sample
from sdeflow.nets import make_net
from sdeflow.nets.classes import check_labels
from sdeflow.nets.oracles import ClassConditionalScoreNet, GaussianMixture
from sdeflow.samplers.guidance import GuidedNet
from oracle_helpers import assert_gaussian_moments

MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64)
STDS = torch.tensor([[0.4, 0.6], [0.5, 0.3], [0.35, 0.35]], dtype=torch.float64)


def _oracle(parameterization="noise"):
    sde = sdeflow.VPSDE()
    mixture = GaussianMixture(MEANS, STDS)
    return sdeflow.PluginReverseSDE(sde, ClassConditionalScoreNet(sde, mixture, parameterization), parameterization), \
        mixture


@pytest.mark.parametrize("label", [0, 2])
def test_without_guidance_a_class_samples_its_exact_conditional(label):
    """w = 0: the probability-flow ODE of the guided oracle draws p(x | y = label), the class's Gaussian."""
    model, _ = _oracle()
    x_T = model.sde.prior_sample((4000, 2), generator=torch.Generator().manual_seed(label), dtype=torch.float64)
    x = sdeflow.sample_ode(guided(model, label), (4000, 2), x_T=x_T, rtol=1e-6, atol=1e-6)
    assert_gaussian_moments(x, GaussianMixture(MEANS[label:label + 1], STDS[label:label + 1]))


def test_the_null_class_samples_the_mixture():
    model, mixture = _oracle("score")
    x = sample(guided(model, None), (6000, 2), SamplerSettings(method="ddim", n_steps=100, lmbd=1.0),
               generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shares = torch.softmax(torch.stack([torch.distributions.Normal(MEANS[k], STDS[k]).log_prob(x).sum(1)
                                        for k in range(3)], 1), 1).mean(0)
    weights = mixture.weights
    assert (shares - weights).abs().max() < 5 * math.sqrt(float(weights.max() * (1 - weights.min())) / 6000) + 0.02


def test_guidance_moves_mass_toward_the_class():
    """As w grows, the Bayes posterior p(y | x) of the requested class, under the data, rises: guidance
    sharpens p(x | y) toward p(x | y)·p(y | x)^w."""
    model, mixture = _oracle()
    label, n = 0, 3000

    def posterior(x):
        logs = torch.stack([torch.distributions.Normal(MEANS[k], STDS[k]).log_prob(x).sum(1) for k in range(3)], 1)
        return torch.softmax(logs + mixture.weights.log(), 1)[:, label]

    means, errors = [], []
    for w in (0.0, 1.0, 4.0):
        x = sample(guided(model, label, w), (n, 2), SamplerSettings(method="ddim", n_steps=50, lmbd=1.0),
                   generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        p = posterior(x)
        means.append(float(p.mean()))
        errors.append(float(p.std()) / math.sqrt(n))
    assert means[0] < means[1] - 3 * (errors[0] + errors[1]) and means[1] < means[2] - 3 * (errors[1] + errors[2])


def test_guided_output_is_the_linear_combination_in_every_parameterization():
    """(1 + w)·o(y) − w·o(∅) of the network's output is (1 + w)·ε̂(y) − w·ε̂(∅): ε̂ is affine in the
    output with label-free coefficients."""
    torch.manual_seed(0)
    net = make_net("mlp", dim=2, hidden=16, n_blocks=1, num_classes=3).double()
    with torch.no_grad():
        net.output.weight.normal_()
    y = torch.randn(5, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    labels = torch.tensor([0, 1, 2, 1, 0])
    for parameterization in ("noise", "score", "drift", "velocity"):
        model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), net, parameterization)
        eps = {name: guided(model, lab).predicted_noise(y, t) for name, lab in (("y", labels), ("null", None))}
        torch.testing.assert_close(guided(model, labels, 2.5).predicted_noise(y, t), 3.5 * eps["y"] - 2.5 * eps["null"])


def test_guidance_works_through_clipping_and_every_method():
    model, _ = _oracle()
    for method in sdeflow.METHODS:
        settings = SamplerSettings(method=method, n_steps=4, clip=(-3.0, 3.0))
        x = sample(guided(model, torch.tensor([0, 1, 2, 0]), 1.5), (4, 2), settings,
                   generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert x.shape == (4, 2) and torch.isfinite(x).all(), method


def test_class_conditional_networks_take_labels_and_a_null_class():
    torch.manual_seed(0)
    mlp = make_net("mlp", dim=2, hidden=8, n_blocks=1, num_classes=4)
    with torch.no_grad():
        mlp.output.weight.normal_()
    y, t = torch.randn(3, 2), torch.full((3,), 0.5)
    assert not torch.equal(mlp(y, t, torch.tensor([0, 0, 0])), mlp(y, t, torch.tensor([1, 1, 1])))
    torch.testing.assert_close(mlp(y, t), mlp(y, t, 4))  # None is the null class, 4
    unet = make_net("unet", preset="small", in_channels=1, image_size=8, base_channels=4, channel_mult=[1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0, num_classes=10, learned_variance=True)
    images = torch.randn(2, 1, 8, 8)
    assert unet(images, torch.full((2,), 0.3), torch.tensor([3, 10])).shape == images.shape
    assert unet.num_classes == 10  # the variance head passes the labels through
    config = sdeflow.model_config(dataset="mnist", net={"name": "mlp", "dim": 2, "num_classes": 4})
    assert config["net"]["num_classes"] == 4  # checkpoints record the classes with the network


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, 5]), r"labels must lie in \[0, 4\]"),
    (torch.tensor([0.5, 1.0]), "labels must be integers"),
    (torch.tensor([0, 1, 2]), r"labels must have shape \(2,\)"),
    ("cat", "labels must be None, an int or a tensor"),
])
def test_bad_labels_are_refused(labels, match):
    with pytest.raises(ValueError, match=match):
        check_labels(labels, 4, 2)


def test_an_unconditional_network_refuses_labels_and_guidance():
    net = make_net("mlp", dim=2, hidden=8, n_blocks=1)
    with pytest.raises(ValueError, match="unconditional network"):
        net(torch.zeros(2, 2), torch.full((2,), 0.5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        guided(sdeflow.PluginReverseSDE(sdeflow.VPSDE(), net, "noise"), 1)
    model, _ = _oracle()
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        GuidedNet(model.net, 0, -1.0)
